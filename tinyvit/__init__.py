"""tinyvit: a Vision Transformer in NumPy/CuPy with hand-written backward passes."""
from .errors import TinyViTError

__all__ = ["TinyViTError"]
