from dlmedit.cli.main import main

main()
