"""`tinyvit fit-erf`, run from a checkout: its parser and code are tinyvit/cli/commands/fit_erf.py."""
from tinyvit.cli.commands.fit_erf import main

if __name__ == "__main__":
    main()
