"""`python -m tinygen` runs the CLI, which is also how `torchrun -m tinygen` starts it."""

from tinygen.cli.app import main

main()
