from services.timeout_sweeper.app import main

main()
