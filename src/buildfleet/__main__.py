from buildfleet.cli import main

main()
