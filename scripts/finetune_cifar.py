"""`tinyvit finetune-cifar`, run from a checkout: its parser and code are tinyvit/cli/commands/finetune_cifar.py."""
from tinyvit.cli.commands.finetune_cifar import main
from tinyvit.cli.report import run

if __name__ == "__main__":
    run(main)
