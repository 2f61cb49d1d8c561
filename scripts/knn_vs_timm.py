"""`tinyvit knn-vs-timm`, run from a checkout: its parser and code are tinyvit/cli/commands/knn_vs_timm.py."""
from tinyvit.cli.commands.knn_vs_timm import main
from tinyvit.cli.report import run

if __name__ == "__main__":
    run(main)
