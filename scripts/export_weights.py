"""`tinyvit export`, run from a checkout: its parser and code are tinyvit/cli/commands/export_weights.py."""
from tinyvit.cli.commands.export_weights import main
from tinyvit.cli.report import run

if __name__ == "__main__":
    run(main)
