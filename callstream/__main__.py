from callstream.cli import main

main(prog_name="callstream")
