"""k-NN classification as DINOv2's eval/knn.py computes it, and exact nearest-neighbour search:
unit-length features, cosine similarity as matrix products a block of queries against a block of the
bank at a time, so memory stays bounded however large the bank (a memory-mapped .npy) is."""
import numpy as np

from ..errors import TinyViTError

BLOCK_ELEMENTS = 1 << 24  # similarities held at once (64 MB of float32)


def unit_rows(x):
    """Rows of x as float32 unit vectors (a zero row stays zero)."""
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), np.float32(1e-12))


def _best(sims, idx, k):
    """The k largest of each row of sims (Q, m) and their indices idx (Q, m), unordered."""
    if sims.shape[1] <= k:
        return sims, idx
    part = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    return np.take_along_axis(sims, part, 1), np.take_along_axis(idx, part, 1)


def topk_cosine(queries, bank, k, query_block=1024, bank_block=None):
    """(sims (Q, k'), indices (Q, k')), k' = min(k, N): each query's k most cosine-similar rows of bank
    (N, D), most similar first (ties: lower index first). queries are unit rows already; bank's rows are
    scaled to unit length a block at a time (it may be a memory-mapped file)."""
    n = len(bank)
    k = min(int(k), n)
    bank_block = bank_block or max(1, BLOCK_ELEMENTS // query_block)
    out_s, out_i = [], []
    for a in range(0, len(queries), query_block):
        q = np.asarray(queries[a:a + query_block], np.float32)  # (q, D)
        best_s = np.empty((len(q), 0), np.float32)
        best_i = np.empty((len(q), 0), np.int64)
        for b in range(0, n, bank_block):
            s = q @ unit_rows(bank[b:b + bank_block]).T  # (q, t)
            i = np.broadcast_to(np.arange(b, b + s.shape[1]), s.shape)
            s, i = _best(s, i, k)
            best_s, best_i = _best(np.concatenate([best_s, s], 1), np.concatenate([best_i, i], 1), k)
        order = np.lexsort((best_i, -best_s), axis=1)  # by similarity, then index
        out_s.append(np.take_along_axis(best_s, order, 1))
        out_i.append(np.take_along_axis(best_i, order, 1))
    return np.concatenate(out_s), np.concatenate(out_i)


def knn_scores(sims, neighbour_labels, num_classes, ks, T=0.07):
    """{k: class scores (Q, C)}: DINOv2's vote, softmax(sims / T) over the max(ks) neighbours, summed per
    class over the first k (the same ranking as exp(sim / T) summed per class)."""
    z = sims / T
    w = np.exp(z - z.max(axis=1, keepdims=True))
    w /= w.sum(axis=1, keepdims=True)  # (Q, K)
    out = {}
    for k in ks:
        scores = np.zeros((len(sims), num_classes), np.float64)
        np.add.at(scores, (np.arange(len(sims))[:, None], neighbour_labels[:, :k]), w[:, :k])
        out[k] = scores
    return out


def topk_hits(scores, y, k):
    """How many rows have label y among their k highest scores (ties: lower class index first)."""
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return int((top == y[:, None]).any(axis=1).sum())


def knn_classify(train, train_y, test, test_y, ks=(10, 20, 100, 200), T=0.07, num_classes=None, query_block=1024,
                 bank_block=None):
    """{k: {"top1": accuracy, "top5": accuracy}} of the k-NN classifier over the labelled train features
    (N, D) for the labelled test features (M, D); labels are class indices (a test label outside the
    train classes is never predicted: it counts as wrong)."""
    ks = sorted(set(int(k) for k in ks))
    if not ks or ks[0] < 1:
        raise TinyViTError(f"k must be at least 1, got {ks}")
    train_y, test_y = np.asarray(train_y, np.int64), np.asarray(test_y, np.int64)
    C = int(num_classes or max(train_y.max(), test_y.max()) + 1)
    hits = {k: [0, 0] for k in ks}
    for a in range(0, len(test), query_block):
        q = unit_rows(test[a:a + query_block])
        sims, idx = topk_cosine(q, train, ks[-1], query_block, bank_block)
        y = test_y[a:a + query_block]
        for k, scores in knn_scores(sims, train_y[idx], C, ks, T).items():
            hits[k][0] += topk_hits(scores, y, 1)
            hits[k][1] += topk_hits(scores, y, 5)
    return {k: {"top1": h1 / len(test), "top5": h5 / len(test)} for k, (h1, h5) in hits.items()}
