"""`python -m pomt_cli ...` (and `torchrun -m pomt_cli ...`) runs the `pomt` command line."""

from pomt_cli.cli import main

if __name__ == "__main__":
    main()
