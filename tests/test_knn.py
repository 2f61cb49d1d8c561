"""tinyvit.train.knn and scripts/knn.py: k-NN as DINOv2's eval/knn.py, against the formula written out here."""
import numpy as np
import pytest
from helpers import last_json, run_script, tiny_photos

from tinyvit.io.embeddings import read_embed_dir
from tinyvit.train.knn import knn_classify, knn_scores, topk_cosine, unit_rows


def direct_knn(train, train_y, test, test_y, ks, T, C):
    """The formula as DINOv2 states it, with nothing blockwise: unit rows, every cosine similarity, the
    top-k neighbours' votes exp(sim / T) summed per class; top-1 and top-5 accuracy (ties: lower class)."""
    a = train / np.linalg.norm(train, axis=1, keepdims=True)
    b = test / np.linalg.norm(test, axis=1, keepdims=True)
    sims = b.astype(np.float64) @ a.T.astype(np.float64)  # (M, N)
    out = {}
    for k in ks:
        votes = np.zeros((len(test), C))
        for m in range(len(test)):
            for j in np.argsort(-sims[m], kind="stable")[:k]:
                votes[m, train_y[j]] += np.exp(sims[m, j] / T)
        ranked = np.argsort(-votes, axis=1, kind="stable")
        out[k] = {"top1": float(np.mean(ranked[:, 0] == test_y)),
                  "top5": float(np.mean((ranked[:, :5] == test_y[:, None]).any(axis=1)))}
    return out


@pytest.mark.parametrize("n,m,d,C,blocks", [(60, 23, 8, 7, (5, 7)), (40, 9, 16, 3, (64, 1 << 10)), (33, 17, 4, 12, (1, 3))])
def test_knn_classify_matches_the_formula(n, m, d, C, blocks):
    rng = np.random.default_rng(n)
    centres = rng.normal(size=(C, d))
    train_y, test_y = rng.integers(0, C, n), rng.integers(0, C, m)
    train = (centres[train_y] + 1.5 * rng.normal(size=(n, d))).astype(np.float32)
    test = (centres[test_y] + 1.5 * rng.normal(size=(m, d))).astype(np.float32)
    ks = [1, 5, 10, 20]
    got = knn_classify(train, train_y, test, test_y, ks, 0.07, C, query_block=blocks[0], bank_block=blocks[1])
    want = direct_knn(train, train_y, test, test_y, ks, 0.07, C)
    assert got == want  # the same images right: accuracies are counts over m
    assert 0 < got[10]["top1"] < 1  # neither trivial nor hopeless: the votes matter


def test_votes_are_dinov2s_softmax_over_the_largest_k():
    sims = np.array([[0.9, 0.8, 0.1]])
    labels = np.array([[2, 0, 2]])
    w = np.exp(sims[0] / 0.07) / np.exp(sims[0] / 0.07).sum()
    s = knn_scores(sims, labels, 3, [2, 3])
    assert s[2][0] == pytest.approx([w[1], 0, w[0]])
    assert s[3][0] == pytest.approx([w[1], 0, w[0] + w[2]])


def test_topk_cosine_is_exact_blockwise():
    rng = np.random.default_rng(0)
    bank, q = rng.normal(size=(101, 6)).astype(np.float32), unit_rows(rng.normal(size=(13, 6)))
    s, i = topk_cosine(q, bank, 7, query_block=4, bank_block=9)
    full = q @ unit_rows(bank).T
    want = np.argsort(-full, axis=1, kind="stable")[:, :7]
    assert (i == want).all()
    assert s == pytest.approx(np.take_along_axis(full, want, 1), abs=1e-6)
    assert topk_cosine(q, bank[:3], 7)[1].shape == (13, 3)  # k beyond the bank: every row


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    """Two embed.py folders (train, val) of the tiny labelled photos."""
    root = tmp_path_factory.mktemp("knn")
    ckpt, photos = tiny_photos(root)
    for split in ("train", "val"):
        r = run_script("embed.py", ckpt, photos / split, "--out", root / split, "--layers", "0")
        assert r.returncode == 0, r.stderr
    return root


@pytest.mark.e2e
def test_knn_script_is_the_library_on_the_folders(embedded):
    r = run_script("knn.py", embedded / "train", embedded / "val", "--k", "1,3", "--json")
    res = last_json(r)
    tr, tr_rows, _ = read_embed_dir(embedded / "train")
    va, va_rows, _ = read_embed_dir(embedded / "val")
    ty, vy = (np.array([ord(label) - ord("a") for _, label in rows]) for rows in (tr_rows, va_rows))
    want = direct_knn(np.asarray(tr), ty, np.asarray(va), vy, [1, 3], 0.07, 2)
    assert {int(k): v for k, v in res["k"].items()} == want
    assert (res["train"], res["val"], res["classes"]) == (6, 4, 2)
    r = run_script("knn.py", embedded / "train", embedded / "val", "--features", "layer0")
    assert r.returncode == 0 and "k =   10" in r.stdout, r.stderr  # the default k: 10,20,100,200


@pytest.mark.e2e
def test_knn_script_refuses_unlabelled_and_cut_folders(embedded, tmp_path):
    ckpt = embedded / "model.npz"
    run_script("embed.py", ckpt, embedded / "photos" / "val" / "a" / "0.png", embedded / "photos" / "val" / "b",
               "--out", tmp_path / "flat")
    r = run_script("knn.py", embedded / "train", tmp_path / "flat")
    assert r.returncode == 2 and "has no label" in r.stderr and r.stderr.count("\n") == 1
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / ".embeddings.npy.partial").write_bytes(b"")
    r = run_script("knn.py", embedded / "train", tmp_path / "cut")
    assert r.returncode == 2 and "was cut before it finished" in r.stderr
