"""Run the CLI as ``python -m alignez_local``."""

from alignez_local.apps.cli import main

main()
