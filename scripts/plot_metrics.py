"""`tinyvit plot`, run from a checkout: its parser and code are tinyvit/cli/commands/plot_metrics.py."""
from tinyvit.cli.commands.plot_metrics import main
from tinyvit.cli.report import run

if __name__ == "__main__":
    run(main)
