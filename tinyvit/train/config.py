"""The optimisation settings of a run (stored in every checkpoint so --resume continues the same run)."""
from dataclasses import dataclass

from .optim import layer_decay_scales, make_optimizer


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings of a run (stored in every checkpoint so --resume continues the same run)."""

    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    optimizer: str = "adamw"  # adam | adamw | sgd
    weight_decay: float = 0.05
    momentum: float = 0.9  # sgd only
    schedule: str = "cosine"  # constant | cosine | exponential
    warmup_epochs: float = 1.0
    min_lr: float = 1e-5
    gamma: float = 0.9  # exponential schedule, per epoch
    clip: float = 0.0  # global grad-norm clip; 0 = off
    label_smoothing: float = 0.0
    augment: str = "none"  # none | shift | crop_flip
    seed: int = 0
    grad_accum: int = 1  # split each batch into this many micro-batches (same result, less memory)
    head_epochs: int = 0  # train only the head for the first N epochs (progressive fine-tuning)
    head_lr: float = 0.0  # lr of those head epochs (cosine to min_lr, then the run's warmup); 0 = one schedule
    ema: float = 0.0  # decay of an exponential moving average of the weights (timm's model EMA); 0 = off
    layer_decay: float = 0.0  # layer-wise lr decay (optim.layer_decay_scales); 0 = off
    train_blocks: int = 0  # partial fine-tuning: the batches are the tokens entering block depth - N, and
    # only the last N blocks, the final norm, the pooling and the head run and train; 0 = the whole model
    freeze: tuple = ()  # shell patterns over the params' names that stay frozen (optim.trainable_names)
    grad_checkpointing: bool = False  # keep each block's input alone, run the block again in the backward
    bias: str = "none"  # "all": every bias trains beside the adapters and head (BitFit; alone without adapters)
    precision: str = "float32"  # float32 | bf16: the linears' GEMMs in bfloat16 (tinyvit.nn.config.ViTConfig.precision)

    def __post_init__(self):
        if not isinstance(self.freeze, (list, tuple)) or not all(isinstance(p, str) for p in self.freeze):
            raise TypeError(f"freeze must be a sequence of name patterns, got {self.freeze!r}")
        object.__setattr__(self, "freeze", tuple(self.freeze))  # a JSON list read back from a checkpoint

    def make_optimizer(self, names=(), depth=0):
        """The optimizer these settings describe; with layer_decay, each of `names` (the params of a
        depth-block model) gets its layer's lr factor."""
        kw = dict(lr=self.lr, weight_decay=self.weight_decay)
        if self.optimizer == "sgd":
            kw["momentum"] = self.momentum
        opt = make_optimizer(self.optimizer, **kw)
        if self.layer_decay:
            opt.lr_scale = layer_decay_scales(names, depth, self.layer_decay)
        return opt
