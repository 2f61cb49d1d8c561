"""tinyvit: a Vision Transformer in NumPy/CuPy with hand-written backward passes."""
from .checkpoint import load_checkpoint, save_checkpoint
from .errors import TinyViTError
from .model import ViTConfig, attention_maps, init_params, preset, vit_backward, vit_features, vit_forward

__all__ = ["TinyViTError", "ViTConfig", "preset", "init_params", "vit_forward", "vit_backward",
           "vit_features", "attention_maps", "load_checkpoint", "save_checkpoint"]
