"""`tinyvit knn`, run from a checkout: its parser and code are tinyvit/cli/commands/knn.py."""
from tinyvit.cli.commands.knn import main
from tinyvit.cli.report import run

if __name__ == "__main__":
    run(main)
