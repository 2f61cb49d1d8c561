"""`tinyvit search`, run from a checkout: its parser and code are tinyvit/cli/commands/search.py."""
from tinyvit.cli.commands.search import main
from tinyvit.cli.report import run

if __name__ == "__main__":
    run(main)
