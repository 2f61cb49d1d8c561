"""scripts/search.py and tinyvit.cli.neighbours: the nearest images of an embed.py folder, for query images
(embedded with the folder's own checkpoint) and for its own rows, as terminal lines, CSV, JSONL and --json."""
import csv
import json

import numpy as np
import pytest
from helpers import last_json, run_script, tiny_photos

from tinyvit.io.embeddings import read_embed_dir

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """An embed.py folder of the tiny photos' training images, and the photos."""
    root = tmp_path_factory.mktemp("search")
    ckpt, photos = tiny_photos(root)
    r = run_script("embed.py", ckpt, photos / "train", "--out", root / "emb")
    assert r.returncode == 0, r.stderr
    return root / "emb", photos


def cosine_order(x, q):
    """Rows of x by cosine similarity to q, most similar first, and the similarities."""
    s = (x / np.linalg.norm(x, axis=1, keepdims=True)) @ (q / np.linalg.norm(q))
    order = np.argsort(-s, kind="stable")
    return order, s[order]


def test_search_queries_and_rows(folder, tmp_path):
    emb, photos = folder
    x, rows, _ = read_embed_dir(emb)
    query = rows[4][0]  # an image of the folder: its own row comes first, similarity 1
    res = last_json(run_script("search.py", emb, query, "--index", "1", "--top-k", "3", "--json"))["results"]
    assert [r["query"] for r in res] == [rows[1][0], query]
    order, sims = cosine_order(np.asarray(x), x[1])
    assert [n["index"] for n in res[0]["neighbours"]] == [int(j) for j in order[1:4]]  # row 1 left out
    assert [n["similarity"] for n in res[0]["neighbours"]] == pytest.approx(sims[1:4], abs=1e-6)
    assert res[1]["neighbours"][0]["image"] == query
    assert res[1]["neighbours"][0]["similarity"] == pytest.approx(1.0, abs=1e-5)
    r = run_script("search.py", emb, photos / "val", "--top-k", "2", "--output", tmp_path / "n.csv")
    assert r.returncode == 0, r.stderr
    table = list(csv.reader(open(tmp_path / "n.csv")))
    assert table[0] == ["query", "image_1", "similarity_1", "image_2", "similarity_2"] and len(table) == 5
    r = run_script("search.py", emb, "--index", "0", "--output", tmp_path / "n.jsonl")
    lines = (tmp_path / "n.jsonl").read_text().splitlines()
    assert r.returncode == 0 and len(lines) == 1 and len(json.loads(lines[0])["neighbours"]) == 5
    r = run_script("search.py", emb, query, "--top-k", "1")
    assert r.returncode == 0 and r.stdout.startswith(f"{query}: {query} (1.000)")


def test_search_refuses_a_changed_checkpoint_and_bad_rows(folder, tmp_path):
    emb, photos = folder
    r = run_script("search.py", emb, "--index", "99")
    assert r.returncode == 2 and "--index 99" in r.stderr and r.stderr.count("\n") == 1
    meta = json.loads((emb / "meta.json").read_text())
    (tmp_path / "emb").mkdir()
    for name in ("embeddings.npy", "images.csv"):
        (tmp_path / "emb" / name).write_bytes((emb / name).read_bytes())
    (tmp_path / "emb" / "meta.json").write_text(json.dumps(dict(meta, sha256="0" * 64)))
    r = run_script("search.py", tmp_path / "emb", photos / "val" / "a" / "0.png")
    assert r.returncode == 2 and "changed since" in r.stderr
