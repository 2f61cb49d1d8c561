"""`tinyvit finetune`, run from a checkout: its parser and code are tinyvit/cli/commands/finetune.py."""
from tinyvit.cli.commands.finetune import main
from tinyvit.cli.report import run

if __name__ == "__main__":
    run(main)
