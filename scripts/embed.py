"""`tinyvit embed`, run from a checkout: its parser and code are tinyvit/cli/commands/embed.py."""
from tinyvit.cli.commands.embed import main
from tinyvit.cli.report import run

if __name__ == "__main__":
    run(main)
