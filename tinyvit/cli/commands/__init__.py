"""The commands, one module each: the parser and code that scripts/NAME.py and `tinyvit SUB` both run."""
