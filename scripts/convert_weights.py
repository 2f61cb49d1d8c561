"""`tinyvit convert`, run from a checkout: its parser and code are tinyvit/cli/commands/convert_weights.py."""
import sys

from tinyvit.cli.commands.convert_weights import main

if __name__ == "__main__":
    sys.exit(main())
