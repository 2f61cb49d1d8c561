"""`tinyvit benchmark`, run from a checkout: its parser and code are tinyvit/cli/commands/benchmark.py."""
from tinyvit.cli.commands.benchmark import main
from tinyvit.cli.report import run

if __name__ == "__main__":
    run(main)
