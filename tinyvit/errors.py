"""The one exception type tinyvit raises for bad input (files, arrays, settings)."""


class TinyViTError(Exception):
    """Bad input or an unusable setting; the message names the file/thing and what is wrong."""
