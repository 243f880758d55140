"""Run the CLI as ``python -m alignez_local``."""

from .cli import main

main()
