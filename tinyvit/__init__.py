"""tinyvit: a Vision Transformer in NumPy/CuPy with hand-written backward passes."""
import os

# OpenBLAS's workers spin for 2^28 cycles (~0.1 s) after every GEMM, taking a core from the NumPy
# passes that follow each matmul in a ViT (GELU right after a GEMM ran 60% slower here). OpenBLAS
# reads this once, when NumPy loads it, so it is set before any NumPy import; a user's value wins.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "16")  # spin 2^16 cycles (~25 us), then sleep

from .checkpoint import load_checkpoint, save_checkpoint
from .convert import load_model
from .errors import TinyViTError
from .images import EvalTransform, eval_transform, load_image
from .model import ViTConfig, attention_maps, init_params, preset, vit_backward, vit_features, vit_forward

__all__ = ["TinyViTError", "ViTConfig", "preset", "init_params", "vit_forward", "vit_backward",
           "vit_features", "attention_maps", "load_checkpoint", "save_checkpoint", "load_model",
           "load_image", "eval_transform", "EvalTransform"]
