"""The nearest images of an embed.py folder by cosine similarity (exact: blockwise matrix products over
every row), for query images or for rows of the folder itself.

Examples:
  python scripts/search.py emb/all my_cat.jpg --top-k 5
  python scripts/search.py emb/all queries/ --output neighbours.csv
  python scripts/search.py emb/all --index 0 --index 17 --output neighbours.jsonl

Query images (a file, a folder searched recursively, or a text file listing images: as predict.py
takes them) are embedded with the folder's own checkpoint (meta.json's, its sha256 checked) and eval
transform; --index I takes row I of the folder (images.csv's index) and leaves that row out of its
own answer. --output neighbours.csv has the columns query, image_1, similarity_1, ..., image_K,
similarity_K; neighbours.jsonl one line per query with the keys --json prints (query, neighbours:
image, index, similarity). An unreadable query image is an error (exit 2).
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np

import tinyvit  # noqa: F401  (before NumPy: sets OpenBLAS's spin time, see tinyvit/__init__.py)
from tinyvit.backend import get_backend, to_device
from tinyvit.cli.embed import embed_queries
from tinyvit.cli.neighbours import as_record, nearest, query_model, write_neighbours
from tinyvit.cli.report import run
from tinyvit.data.listing import expand
from tinyvit.data.transform import eval_transform
from tinyvit.errors import TinyViTError
from tinyvit.io.embeddings import read_embed_dir
from tinyvit.io.files import prepare_out_dir


def parse_args(argv=None):
    """The command line."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", metavar="DIR", help="embed.py's --out folder to search")
    ap.add_argument("queries", nargs="*", metavar="QUERY",
                    help="query images, folders of them (recursive) or text files listing images")
    ap.add_argument("--index", type=int, action="append", default=[], metavar="I",
                    help="search for row I of DIR (repeatable); the row itself is left out of its answer")
    ap.add_argument("--top-k", type=int, default=5, metavar="K", help="neighbours per query (default 5)")
    ap.add_argument("--output", default=None, metavar="NEIGHBOURS.csv",
                    help="write the answers to a .csv (query, image_1, similarity_1, ...) or .jsonl file "
                         "instead of the terminal")
    ap.add_argument("--backend", choices=["numpy", "cupy", "auto"], default="numpy",
                    help="array backend for embedding the queries (default numpy)")
    ap.add_argument("--batch-size", type=int, default=64, help="query images per forward pass (default 64)")
    ap.add_argument("--workers", type=int, default=2, help="decoding threads (default 2)")
    ap.add_argument("--json", action="store_true", help="print one JSON line instead of text")
    args = ap.parse_args(argv)
    if not args.queries and not args.index:
        raise TinyViTError("nothing to search for: give query images or --index I")
    for name in ("top_k", "batch_size", "workers"):
        if getattr(args, name) < 1:
            raise TinyViTError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.output is not None and Path(args.output).suffix.lower() not in (".csv", ".jsonl"):
        raise TinyViTError(f"{args.output}: --output writes .csv or .jsonl: give it one of those suffixes")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.output is not None:
        prepare_out_dir(Path(args.output).parent, "the --output folder")
    bank, rows, meta = read_embed_dir(args.folder)
    results = []
    if args.index:
        bad = next((i for i in args.index if not 0 <= i < len(rows)), None)
        if bad is not None:
            raise TinyViTError(f"--index {bad}: {args.folder} holds rows 0 to {len(rows) - 1}")
        hits = nearest(bank, rows, np.asarray(bank[args.index]), args.top_k, exclude=args.index)
        results += [(rows[i][0], h) for i, h in zip(args.index, hits)]
    if args.queries:
        paths = expand(args.queries)
        params, cfg, model_meta = query_model(meta, args.folder)
        xp = get_backend(args.backend)
        t = eval_transform(model_meta, cfg.in_chans, meta.get("checkpoint", "checkpoint"))
        images, q = embed_queries(paths, to_device(params, xp), cfg, t, xp, args.batch_size, args.workers)
        results += list(zip(images, nearest(bank, rows, q, args.top_k)))
    if args.output is not None:
        write_neighbours(args.output, results)
        print(json.dumps({"output": args.output, "queries": len(results)}) if args.json else
              f"{len(results)} queries -> {args.output}")
        return
    if args.json:
        print(json.dumps({"results": [as_record(q, h) for q, h in results]}))
        return
    for q, hits in results:
        print(f"{q}: " + ", ".join(f"{img} ({s:.3f})" for img, _, s in hits), file=sys.stdout)


if __name__ == "__main__":
    run(main)
