from callstream.cli import main

main()
