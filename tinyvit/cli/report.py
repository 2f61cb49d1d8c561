"""How every script ends: one 'error:' line and exit code 2 for bad input or a system fault, and
the run's result (a readable line or one JSON line)."""
import json
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
    print(f"error: {prefix}{message}", file=sys.stderr)
    w.abort(code)
    sys.exit(code)


def report(summary, args, extra=None):
    """Print the run's result: a readable line, or (with --json) one JSON object as the last line."""
    if not world().lead:  # MPI: rank 0 reports
        return
    out = {k: v for k, v in summary.items() if k != "params"}
    out.update(extra or {})
    if args.json:
        print(json.dumps(out))
    else:
        acc = out.get("test_accuracy")
        acc_s = f"{acc * 100:.2f}%" if acc is not None else "n/a"
        rate = out.get("images_per_second")
        rate_s = f"{rate:.0f} images/s" if rate else "features from the cache"  # head mode's rerun
        print(f"test accuracy {acc_s} after {out['epochs']} epochs, {out['train_seconds']:.0f} s "
              f"({rate_s}); checkpoint: {out['checkpoint']}")
