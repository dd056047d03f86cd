from bridgehook.cli import main

main()
