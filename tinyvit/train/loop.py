"""The training loop every script shares: epochs of batches, evaluation, logs, checkpoints, resume."""
import dataclasses
import json
import math
import signal
import sys
import time
from pathlib import Path

import numpy as np

from ..backend import to_device
from ..cpu.bf16 import check_precision
from ..data.batches import ArrayDataset, num_batches
from ..errors import TinyViTError, describe_os_error
from ..io.checkpoint import save_checkpoint
from ..io.files import atomic_write
from ..nn.layers import cross_entropy_backward, cross_entropy_forward
from ..nn.lora import trainable_names as lora_trainable
from ..nn.model import head_backward, param_stage, vit_backward, vit_forward
from ..nn.partial import tail_backward, tail_forward
from ..progress import Progress
from .config import TrainConfig
from .dist import World, world
from .evaluate import evaluate
from .optim import clip_grad_norm, run_schedule, trainable_names
from .resume import EMA, resume_run
from .tally import DEVICE_READ_EVERY, Tally


class _StopFlag:
    """Turns SIGINT/SIGTERM into a flag checked between steps, so a stop saves a checkpoint first."""

    def __init__(self):
        self.stop, self.signum = False, None  # signum: the signal that asked for the stop
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        if self.stop:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.stop, self.signum = True, signum
        print("\nstopping after this step (a checkpoint is written first; Ctrl-C again to abort)",
              file=sys.stderr)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _train_state(epoch, batch, step, rng, history, tc, tally=None):
    """The JSON-able position of a run, stored in each checkpoint's metadata; mid-epoch, also the
    epoch's running tally, so the resumed epoch logs the same loss and accuracy as an uninterrupted one."""
    state = {"epoch": epoch, "batch": batch, "step": step, "rng": rng.bit_generator.state,
             "history": history, "train_config": dataclasses.asdict(tc)}
    if batch and tally is not None:
        state["tally"] = tally.state()
    return state


def fit(params, cfg, tc: TrainConfig, xp, train: ArrayDataset, test: ArrayDataset, out_dir, *, meta=None,
        resume=None, time_limit=None, save_every=None, max_steps=None, quiet=False):
    """Train params in place on the backend xp; write checkpoints and logs to out_dir.

    Returns a summary dict (test_accuracy, epochs, steps, steps_run: the steps this call ran, after
    the checkpoint when resumed, train_seconds, images_per_second, checkpoint, stopped_early,
    interrupted: the signal's name when SIGINT/SIGTERM stopped the run, else None). With `resume`,
    continues the run saved in that checkpoint exactly; a finished run (every epoch done, its model.npz
    written) is left as it is (already_finished). A checkpoint is written at each epoch's end and, with
    `save_every` (seconds), also that often within an epoch.
    """
    run = _Run(params, cfg, tc, xp, len(train.labels), out_dir, meta, resume, quiet)
    with _StopFlag() as flag:
        while run.epoch < tc.epochs and not run.stopped:
            tally, t_epoch = run.train_epoch(train, flag, time_limit, save_every, max_steps)
            if run.stopped and run.batch < run.steps_per_epoch:
                run.save()  # mid-epoch: resume continues from this batch
                break
            run.end_epoch(tally, t_epoch, test)
    summary = run.finish()
    summary["interrupted"] = signal.Signals(flag.signum).name if flag.signum and summary["stopped_early"] else None
    return summary


class _Run:
    """One training run's state between steps: weights, optimizer, RNGs, EMA, position, log, files."""

    def __init__(self, params, cfg, tc, xp, n_train, out_dir, meta, resume, quiet):
        self.w = w = world()  # MPI ranks (tinyvit.train.dist); one process without a launcher
        check_precision(tc.precision, xp)  # bf16 refused now where it cannot run, not at the first step
        self.cfg, self.tc, self.xp = dataclasses.replace(cfg, precision=tc.precision), tc, xp
        self.quiet = quiet or not w.lead  # only rank 0 prints, logs and writes files
        self.files = _RunFiles(out_dir, w)
        self.opt = tc.make_optimizer(list(params), cfg.depth)
        self.trainable = trainable_names(params, tc.freeze, _adapted_run(params, cfg, tc))  # None: all train
        self.rng = np.random.default_rng(tc.seed)  # dropout; its state travels in the checkpoint
        self.epoch, self.batch, self.step, self.history, ema = 0, 0, 0, [], None
        self.saved_tally = None  # mid-epoch resume: the interrupted epoch's tally so far
        if resume:
            params, self.opt, self.rng, (self.epoch, self.batch, self.step, self.history), ema, self.saved_tally = \
                resume_run(resume, params, cfg, tc, self.opt, self.rng)
            self.files.good = (Path(resume), self.step)
        # a finished run resumed (every epoch done, its model written): nothing to run, nothing rewritten
        self.finished = bool(resume) and self.epoch >= tc.epochs and self.files.final.is_file()
        if resume and not self.finished:
            # the log restarts from the checkpoint's history: epochs logged after it (by a run killed
            # before its next checkpoint) are run again and must not appear twice
            self.files.write_log(self.history)
        if w.rank:  # other ranks draw their own dropout masks, reproducibly (rank 0's state is the saved one)
            self.rng = np.random.default_rng([tc.seed, w.rank, self.step])
        self.params = to_device(params, xp)
        self.ema = None
        if tc.ema:  # evaluated and saved in place of the weights; its state travels in the checkpoint
            self.ema = to_device(ema, xp) if ema is not None else {k: v.copy() for k, v in self.params.items()}
        self.dev_rng = self.rng if xp is np else xp.random.default_rng(tc.seed + self.step)
        self.steps_per_epoch = num_batches(n_train, tc.batch_size, drop_last=True)
        if self.steps_per_epoch == 0:
            raise TinyViTError(f"the training set ({n_train} images) is smaller than one batch ({tc.batch_size})")
        self.schedule = run_schedule(tc, self.steps_per_epoch, say=w.lead and not self.finished)  # extended: over the new length
        self.meta = dict(meta or {})
        self.t_start = self.t_saved = time.perf_counter()  # t_saved: the last checkpoint (or the start)
        self.images_seen, self.stopped, self.ran_steps, self.train_time, self.lr = 0, False, 0, 0.0, None
        self.tally = None  # the running epoch's

    def save(self):
        """The resumable checkpoint at the current position."""
        m = dict(self.meta, train_state=_train_state(self.epoch, self.batch, self.step, self.rng, self.history,
                                                      self.tc, self.tally))
        state = dict(self.opt.state_dict(), **{EMA + k: v for k, v in (self.ema or {}).items()})
        self.files.checkpoint(lambda: save_checkpoint(self.files.ckpt, self.params, self.cfg, m, state), self.step)
        self.t_saved = time.perf_counter()  # --save-every counts from the last checkpoint

    def check(self, tally):
        """Read the steps' losses (one host read); stop before a non-finite one is kept."""
        loss = tally.read()
        if not math.isfinite(loss):
            also = "" if self.xp is np else " (on CuPy, NaN or Inf images also end here: they are not checked per batch)"
            raise TinyViTError(f"training diverged: loss is {loss} at epoch {self.epoch + 1}, step {self.step} "
                               f"(lr {self.lr:.3g}); {self.files.last_good()}; try a lower --lr or --clip 1.0{also}")

    def train_epoch(self, train, flag, time_limit, save_every, max_steps):
        """The rest of this epoch's steps, or until a stop -> (its tally, its start time)."""
        tc, w = self.tc, self.w
        bar = Progress(self.steps_per_epoch, f"epoch {self.epoch + 1}/{tc.epochs}", unit="step",
                       initial=self.batch, disable=self.quiet)
        # NumPy on one process reads the loss every step (free); a GPU or MPI ranks every 10 steps
        tally = self.tally = Tally(1 if self.xp is np and w.size == 1 else DEVICE_READ_EVERY, w)
        t_epoch = time.perf_counter()
        if self.saved_tally is not None:  # the steps this epoch ran before the resume, and their time
            t_epoch -= tally.restore(self.saved_tally)
            self.saved_tally = None
        for x, y in train.batches(tc.batch_size, self.xp, seed=tc.seed, epoch=self.epoch, drop_last=True,
                                  augment=None if tc.augment == "none" else tc.augment, start_batch=self.batch,
                                  dtype=self.params["pos_embed"].dtype, shard=(w.rank, w.size)):
            t_step = time.perf_counter()
            votes = self.train_step(x, y, tally, flag, time_limit, save_every)
            self.images_seen += tc.batch_size
            self.train_time += time.perf_counter() - t_step
            bar.update(1, loss=f"{tally.mean_loss():.4f}", img_s=f"{self.images_seen / self.train_time:.0f}")
            if votes[0] > 0 or (max_steps is not None and self.ran_steps >= max_steps):  # all ranks agree
                self.stopped = True
                break
            if votes[1] > 0 and self.batch < self.steps_per_epoch:  # a hard kill now loses at most save_every
                self.check(tally)
                self.save()
        bar.close()
        self.check(tally)  # the steps not read yet, before anything is saved
        return tally, t_epoch

    def train_step(self, x, y, tally, flag, time_limit, save_every):
        """One optimizer step on a batch (every rank its share) -> the ranks' (stop, save) votes."""
        tc, w = self.tc, self.w
        self.lr = self.schedule(self.step)
        # this rank's share of the global batch mean: the ranks' gradients then simply add up
        loss, correct, grads = _step_grads(self.params, x, y, self.cfg, tc, self.dev_rng, self.epoch < tc.head_epochs,
                                           weight=len(y) / tc.batch_size, trainable=self.trainable)
        tally.add(loss, correct, len(y))
        if tally.due():
            self.check(tally)
        now = time.perf_counter()
        want_stop = flag.stop or (time_limit is not None and now - self.t_start > time_limit)
        # rank 0's clock decides a mid-epoch save; the vote makes every rank take part in it
        want_save = w.lead and save_every is not None and now - self.t_saved > save_every
        grads, votes = w.sum_grads(grads, [float(want_stop), float(want_save)])  # one Allreduce per step
        if tc.clip:
            clip_grad_norm(grads, tc.clip)
        self.opt.step({k: self.params[k] for k in grads}, grads, lr=self.lr)
        if self.ema is not None:
            _ema_update(self.ema, self.params, min(tc.ema, (1 + self.step) / (10 + self.step)))  # timm's warm-up
        self.step, self.batch, self.ran_steps = self.step + 1, self.batch + 1, self.ran_steps + 1
        return votes

    def end_epoch(self, tally, t_epoch, test):
        """Log the finished epoch with its test accuracy, then checkpoint it."""
        self.epoch, self.batch = self.epoch + 1, 0
        rec = {"epoch": self.epoch, "step": self.step, "lr": self.lr, "train_loss": tally.mean_loss(),
               "train_accuracy": tally.correct / max(tally.seen, 1), "epoch_seconds": time.perf_counter() - t_epoch}
        ebar = Progress(len(test.labels), "  evaluating", unit="img", disable=self.quiet)
        rec["test_accuracy"] = evaluate(self.ema or self.params, self.cfg, test, self.xp, progress=ebar, world=self.w,
                                        start=_start(self.cfg, self.tc))
        ebar.close()
        self.history.append(rec)
        self.files.write_log(self.history)
        if not self.quiet:
            print(f"epoch {self.epoch}/{self.tc.epochs}: loss {rec['train_loss']:.4f}  train acc "
                  f"{rec['train_accuracy']:.4f}  test acc {rec['test_accuracy']:.4f}  "
                  f"({rec['epoch_seconds']:.0f} s)", file=sys.stderr)
        self.save()

    def finish(self) -> dict:
        """The final slim model (when every epoch ran) and the run's summary."""
        seconds, done = time.perf_counter() - self.t_start, self.epoch >= self.tc.epochs
        final, weights = self.files.final, self.ema or self.params
        if done and not self.finished:  # a slim copy (no optimizer state) for evaluate.py / predict.py
            m = dict(self.meta, test_accuracy=self.history[-1]["test_accuracy"], history=self.history, ema=self.tc.ema)
            self.files.write("the final model", final, lambda: save_checkpoint(final, weights, self.cfg, m))
        return {"test_accuracy": self.history[-1]["test_accuracy"] if self.history else None,
                "epochs": self.epoch, "steps": self.step, "steps_run": self.ran_steps, "train_seconds": seconds,
                "images_per_second": self.images_seen / self.train_time if self.train_time > 0 else 0.0,
                "checkpoint": str(final if done else self.files.ckpt), "stopped_early": not done, "params": weights,
                "already_finished": self.finished, "trained_params": self.trained_count()}

    def trained_count(self) -> int:
        """How many numbers the optimizer trains (the head's alone in head epochs not counted apart)."""
        start = _start(self.cfg, self.tc)
        names = [k for k in self.params if self.trainable is None or k in self.trainable]
        if start:  # partial: the blocks from start on, the final norm, the pooling and the head
            names = [k for k in names if param_stage(k, self.cfg.depth) >= start]
        return int(sum(self.params[k].size for k in names))


class _RunFiles:
    """A run's output folder (checked writable at start-up) and its files. A write the system refuses
    (full disk, quota, ...) ends the run with one line naming the last good checkpoint and how to
    resume from it; atomic writes leave that checkpoint and the log whole."""

    def __init__(self, out_dir, w: World):
        self.active = w.lead  # False on MPI ranks other than 0: they write nothing
        self.out = w.out_dir(out_dir)
        self.ckpt, self.log, self.final = self.out / "checkpoint.npz", self.out / "metrics.jsonl", self.out / "model.npz"
        self.good = None  # (path, step) of the last checkpoint known to be whole

    def last_good(self) -> str:
        """Where the run can be resumed from, in words."""
        if self.good is None:
            return "no checkpoint was written yet"
        path, step = self.good
        return f"the last good checkpoint is {path} (step {step}): continue with --resume {path}"

    def write(self, what, path, write_fn):
        """write_fn() (an atomic write of path); an OSError becomes one TinyViTError."""
        if not self.active:
            return
        try:
            write_fn()
        except OSError as e:
            raise TinyViTError(f"cannot write {what} {path}: {describe_os_error(e, about=path)}; {self.last_good()}") from None

    def checkpoint(self, write_fn, step):
        """Write the training checkpoint; on success it is the last good one."""
        self.write("the checkpoint", self.ckpt, write_fn)
        self.good = (self.ckpt, step)

    def write_log(self, history):
        """metrics.jsonl as one JSON line per finished epoch (rewritten whole, atomically)."""
        text = "".join(json.dumps(rec) + "\n" for rec in history).encode()
        self.write("the log", self.log, lambda: atomic_write(self.log, lambda f: f.write(text)))


def _adapted_run(params, cfg, tc):
    """What may train in a run with adapters or --bias all: the adapters, the head(s) and (bias "all") every
    bias (tinyvit.nn.lora.trainable_names); None (everything) otherwise."""
    if cfg.lora is None and tc.bias == "none":
        return None
    return lora_trainable(params, tc.bias)


def _start(cfg, tc):
    """The block the batches enter: depth - tc.train_blocks in partial fine-tuning (cached tokens), else 0."""
    return cfg.depth - tc.train_blocks if tc.train_blocks else 0


def _step_grads(params, x, y, cfg, tc, rng, head_only, weight=1.0, trainable=None):
    """Mean loss, correct count (0-d arrays, left on the device) and the gradients of weight x the
    mean loss of one batch, over tc.grad_accum micro-batches (with tc.train_blocks, x holds the tokens
    entering block depth - train_blocks, and only the parameters from there on get gradients);
    otherwise of the trainable params alone (None: all)."""
    k, start = tc.grad_accum, _start(cfg, tc)
    if len(y) % k:
        raise TinyViTError(f"batch size {len(y)} is not divisible by grad_accum {k}")
    m = len(y) // k
    total_loss, correct, grads = 0, 0, None
    for i in range(k):
        xb, yb = x[i * m:(i + 1) * m], y[i * m:(i + 1) * m]
        if start:
            logits, cache = tail_forward(params, xb, cfg, start, train=True, rng=rng)
        else:
            logits, cache = vit_forward(params, xb, cfg, train=True, rng=rng,
                                        grad_checkpointing=tc.grad_checkpointing)
        loss, ce_cache = cross_entropy_forward(logits, yb, tc.label_smoothing)
        dlogits = cross_entropy_backward(weight / k, ce_cache)  # the batch mean is the mean of micro means
        if head_only:  # backbone frozen: only the head's gradient
            g = head_backward(dlogits, cache)
        else:
            g = tail_backward(dlogits, cache) if start else vit_backward(dlogits, cache, trainable)
        if grads is None:
            grads = g
        else:
            for name, v in g.items():
                grads[name] += v
        total_loss = total_loss + loss / k  # no float(): that would be a host read per micro-batch
        correct = correct + (logits.argmax(axis=1) == yb).sum()
    return total_loss, correct, grads


def _ema_update(ema, params, decay):
    """ema = decay * ema + (1 - decay) * params, in place, on the backend."""
    for k, e in ema.items():
        e *= decay
        e += (1.0 - decay) * params[k]
