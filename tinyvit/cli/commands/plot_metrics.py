"""Plot a training run's curves: train loss per epoch, and train and test accuracy per epoch.

Reads the per-epoch records that fit in tinyvit/train/loop.py writes (epoch, step, lr, train_loss,
train_accuracy, epoch_seconds, test_accuracy) from any of:
  RUN_DIR            a run's output folder (its metrics.jsonl)
  metrics.jsonl      the log itself (one JSON object per finished epoch)
  model.npz          a tinyvit checkpoint whose metadata holds the history (model.npz of a finished
                     run, or checkpoint.npz of an unfinished one)
and writes one PNG with two panels; the best test accuracy is marked. Needs matplotlib
(pip install -e ".[plot]"); draws with the Agg backend, so no display is needed.

Example:
  python scripts/plot_metrics.py runs/mnist --out curves.png
"""
import argparse
import json
import math
from pathlib import Path

import tinyvit  # noqa: F401  (before NumPy: sets OpenBLAS's spin time, see tinyvit/__init__.py)
from tinyvit.cli.report import run
from tinyvit.errors import TinyViTError, input_file
from tinyvit.io.checkpoint import load_checkpoint
from tinyvit.io.files import atomic_write, prepare_out_dir

NEEDED = ("epoch", "train_loss", "train_accuracy", "test_accuracy")
MAX_RECORDS = 100_000  # epochs; more is not a training log
STANDARD_NAMES = ("metrics.jsonl", "model.npz", "checkpoint.npz")  # titled by their run folder
INSTALL_HINT = 'plot_metrics.py needs matplotlib: pip install -e ".[plot]"'


def check_record(rec, where):
    """One history record as (epoch, train_loss, train_acc, test_acc); else a TinyViTError at `where`."""
    if not isinstance(rec, dict):
        raise TinyViTError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    missing = [k for k in NEEDED if k not in rec]
    if missing:
        raise TinyViTError(f"{where}: record lacks {', '.join(missing)} (needs {', '.join(NEEDED)})")
    for k in NEEDED:
        v = rec[k]
        if type(v) not in (int, float) or not math.isfinite(v):
            raise TinyViTError(f"{where}: {k} = {str(v)[:40]} is not a finite number")
    for k in ("train_accuracy", "test_accuracy"):
        if not 0 <= rec[k] <= 1:
            raise TinyViTError(f"{where}: {k} = {rec[k]} is not a fraction between 0 and 1")
    return rec["epoch"], rec["train_loss"], rec["train_accuracy"], rec["test_accuracy"]


def check_history(records, where):
    """Checked rows from (place, record) pairs; epochs must increase. `where` names the source."""
    rows, last = [], None
    for place, rec in records:
        if len(rows) >= MAX_RECORDS:
            raise TinyViTError(f"{where}: more than {MAX_RECORDS} records; not a training log")
        row = check_record(rec, place)
        if last is not None and row[0] <= last:
            raise TinyViTError(f"{place}: epoch {row[0]} does not follow epoch {last} (two runs in one log?)")
        rows.append(row)
        last = row[0]
    if not rows:
        raise TinyViTError(f"{where}: no epoch records")
    return rows


def _jsonl_records(path):
    """(place, parsed object) for each non-blank line of a metrics.jsonl."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                yield f"{path}, line {n}", json.loads(raw)
            except (ValueError, RecursionError) as e:  # bad JSON, bad UTF-8, deep nesting
                raise TinyViTError(f"{path}, line {n}: not a JSON record ({' '.join(str(e).split())[:120]})") from None


def read_jsonl(path):
    """Checked rows of a metrics.jsonl file."""
    path = input_file(path, "metrics file")
    return check_history(_jsonl_records(path), str(path))


def read_checkpoint_history(path):
    """Checked rows of the history stored in a checkpoint's metadata (final model or training checkpoint)."""
    _, _, meta = load_checkpoint(path)
    history = meta.get("history")
    if history is None and isinstance(meta.get("train_state"), dict):
        history = meta["train_state"].get("history")
    if history is None:
        raise TinyViTError(f"{path}: the checkpoint's metadata holds no training history")
    if not isinstance(history, list):
        raise TinyViTError(f"{path}: the history in the metadata is not a list of records")
    return check_history(((f"{path}, history record {i}", r) for i, r in enumerate(history, 1)), str(path))


def read_run(source):
    """Rows and a default title for a run folder, a metrics.jsonl or a checkpoint .npz."""
    path = Path(source)
    if path.is_dir():
        rows = read_jsonl(path / "metrics.jsonl")
        folder = path.resolve()
    else:
        rows = read_checkpoint_history(path) if path.suffix.lower() == ".npz" else read_jsonl(path)
        folder = path.resolve().parent if path.name in STANDARD_NAMES else None
    title = folder.name if folder is not None else path.stem
    return rows, title or str(source)


def draw(rows, title, figsize, dpi):
    """The figure: train loss (left); train and test accuracy in percent, best test marked (right)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    epochs = [r[0] for r in rows]
    loss = [r[1] for r in rows]
    train = [100 * r[2] for r in rows]
    test = [100 * r[3] for r in rows]
    best = max(range(len(rows)), key=lambda i: (test[i], -i))  # the first epoch reaching the best

    fig = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(fig)  # the Agg backend: draws to pixels, no display
    ax_loss, ax_acc = fig.subplots(1, 2)
    style = dict(marker="o" if len(rows) <= 30 else None, markersize=3, linewidth=1.5)  # dots only while few
    ax_loss.plot(epochs, loss, color="tab:blue", **style)
    ax_loss.set_title("train loss", fontsize=10)
    ax_acc.plot(epochs, train, color="tab:blue", label="train", **style)
    ax_acc.plot(epochs, test, color="tab:orange", label="test", **style)
    ax_acc.plot([epochs[best]], [test[best]], marker="*", markersize=11, color="tab:red", linestyle="none",
                zorder=3)
    right = len(rows) > 1 and best >= len(rows) / 2  # label on the side with room
    ax_acc.annotate(f"best test {test[best]:.2f}% (epoch {epochs[best]:g})", (epochs[best], test[best]),
                    xytext=(-8 if right else 8, -14), textcoords="offset points",
                    ha="right" if right else "left", va="top", fontsize=8, color="tab:red",
                    bbox=dict(boxstyle="round,pad=0.15", facecolor="white", edgecolor="none", alpha=0.8))
    ax_acc.set_title("accuracy (%)", fontsize=10)
    ax_acc.legend(loc="best", fontsize=8, frameon=False)
    for ax in (ax_loss, ax_acc):
        ax.set_xlabel("epoch", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3, linewidth=0.5)
        ax.spines[["top", "right"]].set_visible(False)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(pad=0.6, w_pad=2.0)
    return fig, epochs[best], test[best]


def parse_args(argv=None):
    """The command line."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", metavar="RUN",
                    help="a run folder (holding metrics.jsonl), a metrics.jsonl file, or a checkpoint .npz with history")
    ap.add_argument("--out", default="curves.png", help="PNG to write (default curves.png)")
    ap.add_argument("--title", default=None,
                    help="figure title (default: the run folder's name, or the file's name without extension)")
    ap.add_argument("--width", type=float, default=8.0, help="figure width in inches (default 8)")
    ap.add_argument("--height", type=float, default=3.0, help="figure height in inches (default 3)")
    ap.add_argument("--dpi", type=int, default=100, help="pixels per inch (default 100: 800x300 px)")
    ap.add_argument("--json", action="store_true", help="print the summary as one JSON line instead of text")
    return ap.parse_args(argv)


def main(argv=None):
    """Read the run's records, draw both panels and write the PNG; one summary line."""
    args = parse_args(argv)
    if not (1 <= args.width <= 40 and 1 <= args.height <= 40):
        raise TinyViTError(f"--width and --height must be 1 to 40 inches, got {args.width} and {args.height}")
    if not 20 <= args.dpi <= 600:
        raise TinyViTError(f"--dpi must be 20 to 600, got {args.dpi}")
    rows, title = read_run(args.run)
    out = Path(args.out)
    prepare_out_dir(out.parent, "the --out folder")
    try:
        import matplotlib
    except ImportError:
        raise TinyViTError(INSTALL_HINT) from None
    matplotlib.use("Agg")
    fig, best_epoch, best_acc = draw(rows, args.title if args.title is not None else title,
                                     (args.width, args.height), args.dpi)
    atomic_write(out, lambda f: fig.savefig(f, format="png", dpi=args.dpi))
    w, h = round(args.width * args.dpi), round(args.height * args.dpi)
    if args.json:
        best_test = next(r[3] for r in rows if r[0] == best_epoch)
        print(json.dumps({"out": str(out), "width": w, "height": h, "epochs": len(rows), "best_epoch": best_epoch,
                          "best_test_accuracy": best_test}))
        return
    print(f"{out}: {w}x{h} px, {len(rows)} epochs, best test accuracy {best_acc:.2f}% at epoch {best_epoch:g}")


if __name__ == "__main__":
    run(main)
