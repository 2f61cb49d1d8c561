"""`tinyvit show-patches`, run from a checkout: its parser and code are tinyvit/cli/commands/show_patches.py."""
from tinyvit.cli.commands.show_patches import main
from tinyvit.cli.report import run

if __name__ == "__main__":
    run(main)
