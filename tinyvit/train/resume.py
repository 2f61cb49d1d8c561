"""A training checkpoint read back to continue its run: params, optimizer and RNG state, EMA and the
interrupted epoch's tally, each checked to belong to this run."""
import dataclasses
import math

from ..errors import TinyViTError
from ..io.checkpoint import load_checkpoint, load_optimizer_state
from .config import TrainConfig

EMA = "ema/"  # the EMA weights' prefix among a checkpoint's optimizer-state entries


def resume_run(path, params, cfg, tc, opt, rng):
    """Load a training checkpoint's params, optimizer and RNG state; check it is the same run."""
    p, ckpt_cfg, meta = load_checkpoint(path)
    state = meta.get("train_state")
    if state is None:
        raise TinyViTError(f"{path}: holds no training state (a model-only file cannot be resumed)")
    if ckpt_cfg != cfg:
        diff = ", ".join(f"{k} {v!r} vs {getattr(cfg, k)!r}" for k, v in dataclasses.asdict(ckpt_cfg).items()
                         if getattr(cfg, k) != v)
        raise TinyViTError(f"{path}: model config differs from this run's (saved vs now: {diff})")
    try:  # the metadata is untrusted JSON: any wrong shape of it is a bad file
        saved = TrainConfig(**state["train_config"])
        saved = dataclasses.replace(saved, grad_checkpointing=tc.grad_checkpointing)  # memory only: the same bits
        position = tuple(state[k] for k in ("epoch", "batch", "step"))
        history = state["history"]
        if not all(type(v) is int and v >= 0 for v in position) or not isinstance(history, list):
            raise TypeError("epoch/batch/step must be ints >= 0 and history a list")
    except (TypeError, KeyError) as e:
        raise TinyViTError(f"{path}: corrupt training state in metadata ({type(e).__name__}: {e})") from None
    extended = dataclasses.replace(saved, epochs=tc.epochs) == tc and tc.epochs > saved.epochs
    if saved != tc and not extended:  # more epochs extend the run; anything else is another run
        diff = {k: (v, getattr(tc, k)) for k, v in dataclasses.asdict(saved).items() if getattr(tc, k) != v}
        raise TinyViTError(f"{path}: training settings differ from this run's (saved, now): {diff}")
    opt_state = load_optimizer_state(path)
    ema = {}
    for key in [k for k in opt_state if k.startswith(EMA)]:
        name = key[len(EMA):]
        if name not in params:
            raise TinyViTError(f"{path}: unexpected entry {key!r} in the training state")
        ema[name] = opt_state.pop(key).astype(params[name].dtype)
    if tc.ema and set(ema) != set(params):
        raise TinyViTError(f"{path}: holds no complete EMA of the weights, which this run (--ema) needs")
    opt.load_state_dict(opt_state)
    try:
        rng.bit_generator.state = state["rng"]
    except (TypeError, ValueError, KeyError) as e:
        raise TinyViTError(f"{path}: corrupt training state in metadata (rng: {e})") from None
    p = {k: v.astype(params[k].dtype, copy=False) for k, v in p.items()}
    return p, opt, rng, (*position, history), (ema or None), _saved_tally(path, state, position[1])


def _saved_tally(path, state, batch):
    """The interrupted epoch's tally in a mid-epoch checkpoint (None at an epoch's end, or in an
    older checkpoint, whose resumed epoch then logs only the steps after the resume)."""
    t = state.get("tally")
    if t is None or batch == 0:
        return None
    ok = (isinstance(t, dict) and all(type(t.get(k)) is int and t[k] >= 0 for k in ("correct", "seen"))
          and all(type(t.get(k)) in (int, float) and math.isfinite(t[k]) and t[k] >= 0 for k in ("loss_sum", "seconds")))
    if not ok:
        raise TinyViTError(f"{path}: corrupt training state in metadata (tally: {str(t)[:80]})")
    return t
