"""``python -m rwcnet``: the command line (:mod:`rwcnet.cli`)."""

from rwcnet.cli import main

main()
