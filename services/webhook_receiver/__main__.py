from services.webhook_receiver.app import main

main()
