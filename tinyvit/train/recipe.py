"""What a fine-tuning run is given, as frozen dataclasses (tinyvit.cli builds them from the flags; the
library never reads argparse's namespace): the recipe, the model it starts from, where its files go.
The data it reads: tinyvit.data.datasets.DataSource; the optimisation: tinyvit.train.config.TrainConfig."""
from dataclasses import dataclass
from typing import Optional

from ..nn.lora import LoraConfig

MODES = ("head", "partial", "full", "progressive")
CACHE_DTYPES = ("float16", "float32")


@dataclass(frozen=True)
class Recipe:
    """Which parameters train, and how: head mode (a linear head on cached features), partial (the last
    train_blocks blocks, the final norm, pooling and head on cached tokens), full, progressive."""

    mode: str = "head"
    train_blocks: int = 0  # partial mode: how many of the last blocks train
    freeze: tuple[str, ...] = ()  # shell patterns over timm's names of parameters that do not train
    grad_checkpointing: bool = False  # keep each block's input only; recompute the block in the backward
    lora: Optional[LoraConfig] = None  # fresh LoRA/DoRA adapters on the blocks' linears (tinyvit.nn.lora)
    adapter: Optional[str] = None  # a PEFT adapter folder whose adapters continue training
    drop_path: float = 0.0  # stochastic depth rate of the blocks that train
    feature_batch: int = 64  # head and partial mode: images per pass of the frozen part
    cache_dir: Optional[str] = None  # head and partial mode: the feature/token cache's folder
    cache_dtype: str = "float16"  # partial mode: the dtype of the cached tokens


@dataclass(frozen=True)
class ModelSource:
    """The weights a run starts from: a file or Hub name, or a preset from random init."""

    weights: Optional[str] = None
    preset: Optional[str] = None  # when weights is None
    img_size: Optional[int] = None  # None: the weights' own size
    crop_pct: Optional[float] = None  # None: the weights' eval transform
    seed: int = 0  # a preset's random init


@dataclass(frozen=True)
class RunOptions:
    """Where a run writes and how it is watched; none of it changes what it computes."""

    out: str
    resume: Optional[str] = None  # a checkpoint.npz to continue
    quiet: bool = False
    backend: str = "numpy"  # numpy, cupy or auto
    time_limit: Optional[float] = None  # seconds, then stop with a resumable checkpoint
    save_every: Optional[float] = None  # seconds between mid-epoch checkpoints
