"""`tinyvit train-mnist`, run from a checkout: its parser and code are tinyvit/cli/commands/train_mnist.py."""
from tinyvit.cli.commands.train_mnist import main
from tinyvit.cli.report import run

if __name__ == "__main__":
    run(main)
