from rwcnet.cli import main

main()
