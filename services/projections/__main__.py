from services.projections.app import main

main()
