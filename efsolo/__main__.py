from efsolo.cli import main

main()
