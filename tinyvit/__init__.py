"""tinyvit: a Vision Transformer in NumPy/CuPy with hand-written backward passes.

The floor plan, each package importing only those below it (tests/test_layout.py checks it):
cli (the scripts' command lines) > train (optimizers, the loop, fine-tuning, MPI) > io (files,
checkpoints, weights in and out) > nn (the ViT's math) and data (datasets, decoding, batches) >
cpu (NumPy speed machinery) > backend (NumPy or CuPy) and errors. viz draws; progress is the bar.
"""
import os
import sys

__version__ = "0.1.0"  # the one place it is written: pyproject.toml reads it ([tool.setuptools.dynamic])

# OpenBLAS's workers spin for 2^28 cycles after every GEMM, taking a core from the NumPy passes that
# follow each matmul in a ViT (the figure: docs/performance.md). OpenBLAS reads this once, when NumPy loads it, so it is set before any NumPy import; a user's value wins.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "16")  # spin 2^16 cycles (~25 us), then sleep

from .data.decode import load_image
from .data.transform import EvalTransform, eval_transform
from .errors import TinyViTError
from .io.checkpoint import load_checkpoint, save_checkpoint
from .io.convert import load_model
from .nn import reference
from .nn.intermediates import vit_intermediates
from .nn.layers import cross_entropy_backward, cross_entropy_forward
from .nn.model import ViTConfig, attention_maps, init_params, preset, vit_backward, vit_features, vit_forward
from .train.optim import SGD, Adam, AdamW

sys.modules[__name__ + ".reference"] = reference  # `import tinyvit.reference` (README's first read) still works

__all__ = ["TinyViTError", "ViTConfig", "preset", "init_params", "vit_forward", "vit_backward",
           "vit_features", "vit_intermediates", "attention_maps", "load_checkpoint", "save_checkpoint", "load_model",
           "load_image", "eval_transform", "EvalTransform", "cross_entropy_forward", "cross_entropy_backward",
           "Adam", "AdamW", "SGD", "reference"]
