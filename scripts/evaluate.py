"""`tinyvit evaluate`, run from a checkout: its parser and code are tinyvit/cli/commands/evaluate.py."""
from tinyvit.cli.commands.evaluate import main
from tinyvit.cli.report import run

if __name__ == "__main__":
    run(main)
