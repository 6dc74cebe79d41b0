from services.command_handler.app import main

main()
