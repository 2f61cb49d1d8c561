"""`tinyvit decode-rate`, run from a checkout: its parser and code are tinyvit/cli/commands/decode_rate.py."""
from tinyvit.cli.commands.decode_rate import main
from tinyvit.cli.report import run

if __name__ == "__main__":
    run(main)
