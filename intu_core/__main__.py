"""`python -m intu_core` runs the `intu` command."""

from intu_core.cli import main

main()
