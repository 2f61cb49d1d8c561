"""Top-1 accuracy of a model on a dataset, in eval mode (and over MPI ranks)."""
import numpy as np

from ..backend import to_numpy
from ..data.batches import ArrayDataset
from ..errors import TinyViTError
from ..nn.model import vit_forward
from ..nn.partial import tail_forward
from .dist import World


def eval_batch_size(cfg, limit=500):
    """Images per inference pass: about 64k tokens, so a 224 px ViT stays within a few GB."""
    return max(1, min(limit, 65536 // (cfg.num_patches + 1)))


def evaluate(params, cfg, data: ArrayDataset, xp, batch_size=None, progress=None, world=None, flip=False, start=0):
    """Top-1 accuracy (a fraction) of params on a dataset, in eval mode, without backward caches.
    With MPI ranks (world) each scores its part of every batch and the counts are summed. With
    flip, each image is scored by its logits plus those of its left-right mirror (test-time
    augmentation: twice the passes). start > 0: the data are the tokens entering that block
    (partial fine-tuning's cache), which tail_forward takes."""
    if flip and start:
        raise TinyViTError("flip takes images, not the cached tokens entering a block")
    w = world or World()
    tally = xp.zeros(2, dtype=xp.int64)  # (correct, non-finite logits) on the backend: one read at the end
    batch_size = batch_size or eval_batch_size(cfg)
    for x, y in data.batches(batch_size, xp, shuffle=False, dtype=params["pos_embed"].dtype, shard=(w.rank, w.size)):
        logits, _ = (tail_forward(params, x, cfg, start, keep_cache=False) if start else
                     vit_forward(params, x, cfg, keep_cache=False))
        if flip:
            logits = logits + vit_forward(params, x[..., ::-1], cfg, keep_cache=False)[0]  # (B, C, H, W) mirrored
        tally = tally + xp.stack([(logits.argmax(axis=1) == y).sum(), (~xp.isfinite(logits)).sum()])
        if progress:
            progress.update(len(y) * w.size)
    correct, bad = (int(v) for v in w.sum_(to_numpy(tally).astype(np.int64)))
    if bad:  # argmax would quietly count them as class 0
        raise TinyViTError("evaluation produced NaN or Inf logits: the images or the params hold "
                           "non-finite values")
    return correct / max(len(data.labels), 1)
