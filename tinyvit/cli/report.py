"""How every script ends: one 'error:' line and exit code 2 for bad input or a system fault, and
the run's result (a readable line or one JSON line)."""
import json
import os
import shlex
import signal
import sys

from ..errors import TinyViTError, describe_os_error
from ..train.dist import world


def run(main):
    """Call main(); a TinyViTError or an operating-system fault (full disk, no permission, ...)
    becomes one 'error: ...' line on stderr and exit code 2, never a traceback."""
    try:
        code = main()
    except TinyViTError as e:
        _fail(str(e))
    except OSError as e:
        _fail(describe_os_error(e))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)


def _fail(message, code=2):
    """One 'error:' line and exit; under MPI (several ranks) the whole job ends, so none waits."""
    w = world()
    prefix = f"rank {w.rank}: " if w.size > 1 and not w.lead else ""
    sys.stderr.write(f"error: {prefix}{message}\n")  # one write: ranks sharing a terminal keep whole lines
    sys.stderr.flush()
    w.abort(code)
    sys.exit(code)


def resume_command(args, checkpoint) -> str:
    """The command line that continues a run from checkpoint: this script (or `tinyvit SUB`), --resume, and
    the flags a checkpoint does not keep (where the data is, the backend)."""
    here = sys.argv[0] or "SCRIPT"
    cmd = [*(here.split() if here.startswith("tinyvit ") else ["python", here]), "--resume", str(checkpoint)]
    if getattr(args, "data_dir", None):
        cmd += ["--data-dir", str(args.data_dir)]
    if getattr(args, "backend", "numpy") != "numpy":
        cmd += ["--backend", args.backend]
    return " ".join(shlex.quote(c) for c in cmd)


def _epochs(n) -> str:
    return f"{n} epoch" + ("" if n == 1 else "s")


def report(summary, args, extra=None) -> int:
    """Print the run's result: a readable line, or (with --json) one JSON object as the last line.
    Returns the exit code: 0, or 128 + the signal's number for a run a signal stopped (130 for Ctrl-C)."""
    stop = summary.get("interrupted")
    code = 128 + signal.Signals[stop].value if stop else 0
    if not world().lead:  # MPI: rank 0 reports
        return code
    out = {k: v for k, v in summary.items() if k != "params"}
    out.update(extra or {})
    if summary.get("already_finished"):
        print(f"the run in {os.path.dirname(out['checkpoint'])} is finished ({_epochs(out['epochs'])}): nothing was changed "
              f"(a larger --epochs with --resume extends it)", file=sys.stderr)
    if stop:
        print(f"interrupted ({stop}) at step {out.get('steps')}, after {_epochs(out['epochs'])} finished: the run is "
              f"saved in {out['checkpoint']}; continue it with: {resume_command(args, out['checkpoint'])}",
              file=sys.stderr)
    if args.json:
        print(json.dumps(out))
    elif not stop:  # an interrupted run's line is the one above: no result line to mistake for one
        acc = out.get("test_accuracy")
        acc_s = f"{acc * 100:.2f}%" if acc is not None else "n/a"
        rate = out.get("images_per_second")
        rate_s = (f"{rate:.0f} images/s" if rate else "features from the cache" if out.get("features_cached")
                  else "already finished" if out.get("already_finished") else "no steps run")
        print(f"test accuracy {acc_s} after {out['epochs']} epochs, {out['train_seconds']:.0f} s "
              f"({rate_s}); checkpoint: {out['checkpoint']}")
    return code
