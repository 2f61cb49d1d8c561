"""Optimizers (Adam, AdamW, SGD), global-norm gradient clipping and learning-rate schedules.

Parameters, gradients and optimizer state are dict[str, array] keyed by timm names; NumPy or CuPy.
Optimizers follow torch.optim's single-tensor formulas (foreach=False) and update params in place.
State round-trips through state_dict()/load_state_dict() (flat keys `kind/param_name` plus a 0-d
int64 `step`), so an .npz checkpoint resumes bit-exactly.
"""
import fnmatch
import math
import sys

import numpy as np

from ..backend import get_array_module
from ..cpu.threads import in_place_blocks
from ..errors import TinyViTError

# timm's VisionTransformer.no_weight_decay(); plus every 1-D param and every `.bias` (timm's rule).
NO_DECAY_NAMES = frozenset({"cls_token", "pos_embed", "dist_token", "reg_token", "latent"})
EMBEDDINGS = ("cls_token", "dist_token", "reg_token", "pos_embed", "patch_embed.", "norm_pre.")


def decays(name: str, x) -> bool:
    """True when weight decay applies: not a bias, not 1-D (norms, LayerScale gammas), not a token, the
    position embedding or the attention pool's latent."""
    if x.ndim <= 1 or name.endswith(".bias"):
        return False
    return name.rsplit(".", 1)[-1] not in NO_DECAY_NAMES


def layer_decay_scales(names, depth: int, decay: float) -> dict:
    """Layer-wise lr decay (BEiT, MAE, DINOv2 fine-tuning; timm's param_groups_layer_decay): the head,
    final norm and attention pool at the base lr, block i times decay ** (depth - i), the embeddings
    (tokens, position and patch embedding, norm_pre) times decay ** (depth + 1)."""
    def layer(name):
        if name.startswith(EMBEDDINGS):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return depth + 1
    return {n: float(decay) ** (depth + 1 - layer(n)) for n in names}


def trainable_names(names, freeze, only=None):
    """The params that train when those matching any of the shell patterns in freeze (fnmatch over timm's
    names, e.g. 'patch_embed.*', 'blocks.[0-5].*') stay frozen, among `only` (None: every name; LoRA's
    adapters and head, tinyvit.nn.lora.trainable_names): a frozenset, or None (all) when nothing is frozen."""
    if not freeze and only is None:
        return None
    names = list(names)
    if not freeze:
        return frozenset(only)
    for pattern in freeze:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            blocks = sorted({int(n.split(".")[1]) for n in names if n.startswith("blocks.")})
            some = ", ".join(["patch_embed.*", *(f"blocks.{i}.*" for i in blocks[:1] + blocks[-1:]), names[-1]])
            raise TinyViTError(f"--freeze {pattern!r} matches no parameter of the model (timm's names: {some}; "
                               f"{len(blocks)} blocks)")
    allowed = set(names if only is None else only)
    trained = frozenset(n for n in names if n in allowed and not any(fnmatch.fnmatchcase(n, p) for p in freeze))
    if not trained:
        raise TinyViTError(f"--freeze {','.join(freeze)} freezes every parameter: nothing would train")
    return trained


class _Optimizer:
    """Shared plumbing: lr/decay settings, the step counter, per-name state and scratch buffers."""

    STATE = ()  # names of the per-parameter state buffers, e.g. ("exp_avg", "exp_avg_sq")

    def __init__(self, lr, weight_decay, decay_filter):
        if not lr >= 0.0:
            raise TinyViTError(f"{type(self).__name__}: lr must be >= 0, got {lr}")
        if not weight_decay >= 0.0:
            raise TinyViTError(f"{type(self).__name__}: weight_decay must be >= 0, got {weight_decay}")
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.decay_filter = bool(decay_filter)
        self.step_count = 0
        self.lr_scale = {}  # name -> factor on the lr (layer-wise decay); 1 for names not in it
        self.state = {kind: {} for kind in self.STATE}
        self._scratch = {}  # (module, dtype) -> (2, n) buffer reused by every parameter

    def _decay(self, name, p) -> float:
        """The weight decay for this parameter (0 when filtered out)."""
        if self.weight_decay == 0.0 or (self.decay_filter and not decays(name, p)):
            return 0.0
        return self.weight_decay

    def _buffers(self, xp, p):
        """Two scratch arrays shaped like p (views into one reusable buffer per dtype)."""
        key = (xp.__name__, p.dtype.str)
        buf = self._scratch.get(key)
        if buf is None or buf.shape[1] < p.size:
            buf = self._scratch[key] = xp.empty((2, p.size), dtype=p.dtype)
        return buf[0, : p.size].reshape(p.shape), buf[1, : p.size].reshape(p.shape)

    def _slot(self, kind, name, p, xp, init):
        """The state buffer `kind` for `name`, created by init() or moved onto p's backend/dtype."""
        s = self.state[kind].get(name)
        if s is None:
            s = init()
        elif s.shape != p.shape:
            raise TinyViTError(f"optimizer state {kind}/{name} has shape {s.shape}, param has {p.shape}")
        elif get_array_module(s) is not xp or s.dtype != p.dtype:
            s = xp.asarray(s, dtype=p.dtype)
        self.state[kind][name] = s
        return s

    def step(self, params, grads, lr=None):
        """One update of every param in place; lr overrides the base lr (driven by a schedule)."""
        if params.keys() != grads.keys():
            bad = sorted(params.keys() ^ grads.keys())
            raise TinyViTError(f"{type(self).__name__}.step: params and grads differ in names, e.g. {bad[0]!r}")
        lr = self.lr if lr is None else float(lr)
        self.step_count += 1
        for name, p in params.items():
            g = grads[name]
            if g.shape != p.shape:
                raise TinyViTError(f"grad {name} has shape {g.shape}, param has {p.shape}")
            self._update(name, p, g, lr * self.lr_scale.get(name, 1.0), get_array_module(p))

    def _update(self, name, p, g, lr, xp):
        raise NotImplementedError

    def state_dict(self):
        """Flat copy of the state: `kind/name` arrays plus `step` (0-d int64)."""
        d = {"step": np.array(self.step_count, dtype=np.int64)}
        for kind, slots in self.state.items():
            for name, s in slots.items():
                d[f"{kind}/{name}"] = s.copy()
        return d

    def load_state_dict(self, d):
        """Replace the state with a (copied) state_dict, e.g. read back from an .npz."""
        if "step" not in d:
            raise TinyViTError(f"{type(self).__name__} state: no 'step' entry")
        step = np.asarray(d["step"]) if get_array_module(d["step"]) is np else d["step"].get()
        if step.shape != () or step.dtype.kind not in "iu" or int(step) < 0:
            raise TinyViTError(f"{type(self).__name__} state: 'step' must be a 0-d non-negative int")
        state = {kind: {} for kind in self.STATE}
        for key in d.keys():
            if key == "step":
                continue
            kind, _, name = key.partition("/")
            if kind not in state or not name:
                raise TinyViTError(f"{type(self).__name__} state: unexpected entry {key!r}")
            x = d[key] if hasattr(d[key], "dtype") else np.asarray(d[key])
            if x.dtype.kind != "f":
                raise TinyViTError(f"{type(self).__name__} state: {key} has dtype {x.dtype}, expected float")
            state[kind][name] = get_array_module(x).array(x, copy=True)
        self.state, self.step_count = state, int(step)


class Adam(_Optimizer):
    """torch.optim.Adam: L2 weight decay added to the grad (on all params unless decay_filter)."""

    STATE = ("exp_avg", "exp_avg_sq")

    def __init__(self, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, decay_filter=False):
        super().__init__(lr, weight_decay, decay_filter)
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0) or not eps >= 0.0:
            raise TinyViTError(f"{type(self).__name__}: need 0 <= betas < 1 and eps >= 0, got {betas}, {eps}")
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps = float(eps)

    def _l2(self, name, p):
        """Coefficient of the L2 term added to the grad (Adam) -- AdamW overrides with 0."""
        return self._decay(name, p)

    def _shrink(self, lr, name, p):
        """Factor p is multiplied by before the step: 1 for Adam, 1 - lr * wd for AdamW."""
        return 1.0

    def _update(self, name, p, g, lr, xp):
        m = self._slot("exp_avg", name, p, xp, lambda: xp.zeros_like(p))
        v = self._slot("exp_avg_sq", name, p, xp, lambda: xp.zeros_like(p))
        t = self.step_count
        coefs = (self._shrink(lr, name, p), self._l2(name, p), lr / (1.0 - self.betas[0] ** t),
                 math.sqrt(1.0 - self.betas[1] ** t))
        # in cache-sized blocks on the thread pool: the ~12 passes stay in L2 (docs/performance.md)
        in_place_blocks(lambda g, p, m, v: self._adam_block(g, p, m, v, *coefs), [g], [p, m, v])

    def _adam_block(self, g, p, m, v, shrink, l2, step_size, bias2_root):
        """torch's single-tensor Adam(W) update of one block of p, m, v (in place) from grad g."""
        xp = get_array_module(p)
        b1, b2 = self.betas
        if shrink != 1.0:
            p *= shrink  # AdamW: decoupled decay
        if l2:
            g = g + l2 * p  # Adam: L2 decay in the grad (caller's grad untouched)
        a = g - m  # m.lerp_(g, 1 - b1) as torch: m + (1 - b1) * (g - m)
        a *= 1.0 - b1
        m += a
        v *= b2
        xp.multiply(g, g, out=a)
        a *= 1.0 - b2
        v += a
        xp.sqrt(v, out=a)
        a /= bias2_root
        a += self.eps  # denom
        xp.divide(m, a, out=a)
        a *= step_size
        p -= a


class AdamW(Adam):
    """torch.optim.AdamW: decoupled decay p *= 1 - lr*wd, only where decays() (unless decay_filter=False)."""

    def __init__(self, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05, decay_filter=True):
        super().__init__(lr, betas, eps, weight_decay, decay_filter)

    def _l2(self, name, p):
        return 0.0

    def _shrink(self, lr, name, p):
        return 1.0 - lr * self._decay(name, p)


class SGD(_Optimizer):
    """torch.optim.SGD (dampening 0): L2 decay on all params unless decay_filter=True."""

    STATE = ("momentum_buffer",)

    def __init__(self, lr=1e-3, momentum=0.9, weight_decay=0.0, nesterov=False, decay_filter=False):
        super().__init__(lr, weight_decay, decay_filter)
        if not momentum >= 0.0 or (nesterov and momentum == 0.0):
            raise TinyViTError(f"SGD: need momentum >= 0 (> 0 for nesterov), got {momentum}")
        self.momentum = float(momentum)
        self.nesterov = bool(nesterov)

    def _update(self, name, p, g, lr, xp):
        a, b = self._buffers(xp, p)
        wd = self._decay(name, p)
        if wd:
            g = xp.add(g, xp.multiply(p, wd, out=b), out=b)  # g + wd * p
        if self.momentum:
            buf = self.state["momentum_buffer"].get(name)
            if buf is None:  # torch: the buffer starts as a copy of the first grad
                buf = self._slot("momentum_buffer", name, p, xp, lambda: g.astype(p.dtype, copy=True))
            else:
                buf = self._slot("momentum_buffer", name, p, xp, None)
                buf *= self.momentum
                buf += g
            if self.nesterov:
                g = xp.add(g, xp.multiply(buf, self.momentum, out=a), out=a)  # g + momentum * buf
            else:
                g = buf
        xp.multiply(g, lr, out=a)
        p -= a


_OPTIMIZERS = {"adam": Adam, "adamw": AdamW, "sgd": SGD}


def make_optimizer(name: str, **kw):
    """Build 'adam', 'adamw' or 'sgd' with its keyword settings."""
    cls = _OPTIMIZERS.get(name.lower())
    if cls is None:
        raise TinyViTError(f"unknown optimizer {name!r}: choose one of {', '.join(_OPTIMIZERS)}")
    try:
        return cls(**kw)
    except TypeError as e:
        raise TinyViTError(f"optimizer {name!r}: bad settings ({e})") from None


def clip_grad_norm(grads, max_norm: float):
    """Global L2 norm of all grads; scale them in place by max_norm/(norm+1e-6) when that is < 1.

    Returns the norm: a float on NumPy; on CuPy a 0-d device array, decided on the device (reading
    it is a host sync, so it is left to the caller). A non-finite norm leaves the grads as they are."""
    if not grads:
        return 0.0
    xp = get_array_module(*grads.values())
    sq = [xp.vdot(g.ravel(), g.ravel()) for g in grads.values()]  # one sum of squares per grad
    total = xp.sqrt(xp.sum(xp.stack(sq).astype(xp.float64)))
    if xp is not np:
        coef = xp.minimum(float(max_norm) / (total + 1e-6), 1.0)
        coef = xp.where(xp.isfinite(total), coef, 1.0)  # as the NumPy path: no scaling by NaN
        for g in grads.values():
            g *= coef.astype(g.dtype)
        return total
    total = float(total)
    if not math.isfinite(total):
        return total  # the training loop decides (skip the step, stop, ...)
    coef = float(max_norm) / (total + 1e-6)
    if coef < 1.0:
        for g in grads.values():
            g *= coef
    return total


# --- learning-rate schedules: pure functions of the step (or epoch) ------------------------------


def constant(base_lr: float, step=None) -> float:
    """The same lr at every step."""
    return float(base_lr)


def warmup_cosine(step, total_steps, base_lr, warmup_steps=0, min_lr=0.0) -> float:
    """Linear warmup base_lr*step/warmup_steps (0 at step 0), then cosine to min_lr at total_steps.

    After warmup: min_lr + (base_lr - min_lr) * (1 + cos(pi * (step - W) / (total_steps - W))) / 2,
    i.e. torch SequentialLR([LambdaLR(s / W), CosineAnnealingLR(T_max=total - W, eta_min)], [W]).
    Steps past total_steps give min_lr.
    """
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    if step >= total_steps:
        return float(min_lr)
    span = total_steps - warmup_steps
    return min_lr + (base_lr - min_lr) * (1.0 + math.cos(math.pi * (step - warmup_steps) / span)) / 2.0


def exponential(epoch, base_lr, gamma) -> float:
    """base_lr * gamma**epoch, as torch ExponentialLR stepped once per epoch."""
    return base_lr * gamma**epoch


SCHEDULES = ("constant", "cosine", "exponential")


def make_schedule(name, base_lr, total_steps=None, warmup_steps=0, steps_per_epoch=1, gamma=None,
                  min_lr=0.0):
    """callable(step) -> lr; every schedule gets the same linear warmup over warmup_steps first.

    After warmup, constant gives base_lr, cosine decays to min_lr at total_steps, and exponential
    gives base_lr * gamma**((step - warmup_steps) // steps_per_epoch).
    """
    if name not in SCHEDULES:
        raise TinyViTError(f"unknown schedule {name!r}: choose one of {', '.join(SCHEDULES)}")
    base_lr, w = float(base_lr), int(warmup_steps)
    if w < 0 or int(steps_per_epoch) < 1:
        raise TinyViTError("schedule: need warmup_steps >= 0 and steps_per_epoch >= 1")
    if name == "cosine":
        if total_steps is None or total_steps <= w:
            raise TinyViTError(f"cosine schedule: total_steps ({total_steps}) must exceed warmup_steps ({w})")
        return lambda step: warmup_cosine(step, total_steps, base_lr, w, min_lr)
    if name == "exponential":
        if gamma is None or not gamma > 0.0:
            raise TinyViTError(f"exponential schedule: gamma must be > 0, got {gamma}")
        spe, gamma = int(steps_per_epoch), float(gamma)
        after = lambda step: exponential((step - w) // spe, base_lr, gamma)  # noqa: E731
    else:
        after = lambda step: base_lr  # noqa: E731
    return lambda step: base_lr * step / w if step < w else after(step)


def warmup_steps(tc, steps_per_epoch, say=False):
    """The warmup in steps: --warmup-epochs, or a tenth of a run that is not longer than it (said)."""
    total, warm = tc.epochs * steps_per_epoch, round(tc.warmup_epochs * steps_per_epoch)
    if warm >= total > 0:
        warm = total // 10
        if say:
            print(f"note: warmup shortened from {tc.warmup_epochs:g} to {warm / steps_per_epoch:g} epochs "
                  f"({warm} steps), a tenth of this {tc.epochs}-epoch run", file=sys.stderr)
    return warm


def run_schedule(tc, steps_per_epoch, say=False):
    """callable(step) -> lr over the whole run (a run resumed with more epochs: over the new length)."""
    warm = warmup_steps(tc, steps_per_epoch, say)
    if tc.head_epochs and tc.head_lr:  # progressive: the new head at head mode's lr, then the full recipe
        return _phased(tc, steps_per_epoch, warm)
    return make_schedule(tc.schedule, tc.lr, tc.epochs * steps_per_epoch, warm, steps_per_epoch, tc.gamma, tc.min_lr)


def _phased(tc, steps_per_epoch, warm):
    """Progressive fine-tuning: cosine from head_lr to min_lr over the head epochs, then the run's own
    warmup and schedule over the rest."""
    head = tc.head_epochs * steps_per_epoch
    rest = tc.epochs * steps_per_epoch - head
    if rest <= 0:
        raise TinyViTError(f"--head-epochs ({tc.head_epochs}) must be fewer than --epochs ({tc.epochs})")
    warm = warm if warm < rest else rest // 10
    after = make_schedule(tc.schedule, tc.lr, rest, warm, steps_per_epoch, tc.gamma, tc.min_lr)
    return lambda s: warmup_cosine(s, head, tc.head_lr, 0, tc.min_lr) if s < head else after(s - head)
