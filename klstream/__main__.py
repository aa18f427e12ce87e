from klstream.cli import main

main()
