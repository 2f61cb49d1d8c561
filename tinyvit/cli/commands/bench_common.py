"""What the benchmark's cases share: the median of a timed closure, tinyvit's train step, the torch model
each races and the preset overrides its flags give (PyTorch, timm and transformers imported lazily:
tinyvit itself never needs them)."""
import sys
import time

import numpy as np

from tinyvit import preset, vit_backward, vit_forward
from tinyvit.backend import synchronize
from tinyvit.errors import TinyViTError
from tinyvit.nn.layers import cross_entropy_backward, cross_entropy_forward
from tinyvit.train.optim import AdamW


def median_time(fn, xp, reps):
    """Median wall time of fn() over reps runs, after one warm-up, with device syncs around it."""
    fn()
    synchronize(xp)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        synchronize(xp)
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def train_step(params, cfg, x, y, names):
    """One train step of tinyvit (AdamW at lr 0: every step times the same weights) over `names` (None: all)."""
    opt = AdamW(lr=0.0)

    def step():
        logits, cache = vit_forward(params, x, cfg, train=True)
        _, ce = cross_entropy_forward(logits, y)
        grads = vit_backward(cross_entropy_backward(1.0, ce), cache, names)
        opt.step({k: params[k] for k in grads}, grads)
    return step


def torch_model(cfg, params, dtype, rival="auto"):
    """The torch model to race: the tests' reference ViT for the 2020 ViT (rival 'auto'), timm's own model
    for the rest of the family (LayerScale, registers, pooling, ...) or for all (rival 'timm'), loaded
    strictly with the same params."""
    import torch

    from tinyvit.cli.torch_vit import torch_vit_from_params

    plain = preset("vit-b16", **{k: getattr(cfg, k) for k in ("img_size", "patch_size", "in_chans", "num_classes",
                                                             "dim", "depth", "heads", "mlp_dim", "ln_eps", "gelu")})
    if rival == "auto" and cfg == plain and cfg.gelu != "quick":
        return torch_vit_from_params(cfg, params, dtype)
    import functools

    stub_torchvision_ops()
    try:
        from timm.models.deit import VisionTransformerDistilled
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:
        raise TinyViTError("this preset races timm's own model: pip install --no-deps torchvision==0.28.0 timm "
                           "(README, Tests)") from None
    from tinyvit.io.export import timm_model_args

    cls = VisionTransformerDistilled if cfg.distilled else VisionTransformer
    model = cls(**timm_model_args(cfg), norm_layer=functools.partial(torch.nn.LayerNorm, eps=cfg.ln_eps))
    model.load_state_dict({k: torch.tensor(v) for k, v in params.items()}, strict=True)
    return model.to(dtype)


def stub_torchvision_ops():
    """Let timm and transformers import torchvision beside the CPU torch wheel, which lacks its C ops."""
    import types

    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))


def preset_overrides(args):
    """The preset overrides the flags give (--img-size, --patch-size)."""
    return {k: v for k, v in (("img_size", args.img_size), ("patch_size", args.patch_size)) if v}
