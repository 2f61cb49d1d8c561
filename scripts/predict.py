"""`tinyvit predict`, run from a checkout: its parser and code are tinyvit/cli/commands/predict.py."""
from tinyvit.cli.commands.predict import main
from tinyvit.cli.report import run

if __name__ == "__main__":
    run(main)
