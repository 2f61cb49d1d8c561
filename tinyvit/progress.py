"""A small progress bar on stderr (no dependency): in place on a terminal, a line now and then in logs."""
import sys
import time


class Progress:
    """Progress(total, desc).update(n, **stats) ... close(); quiet when disabled."""

    def __init__(self, total, desc="", unit="it", initial=0, disable=False, stream=None, every=30.0):
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.stream = stream or sys.stderr
        self.disable = disable
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.every = 0.2 if self.tty else every  # seconds between redraws / log lines
        self.t0 = self.last = time.perf_counter()
        self.stats = {}

    def _line(self):
        frac = self.n / self.total if self.total else 1.0
        width = 24
        fill = int(frac * width)
        bar = "#" * fill + "-" * (width - fill)
        elapsed = time.perf_counter() - self.t0
        stats = "  ".join(f"{k} {v}" for k, v in self.stats.items())
        return f"{self.desc} [{bar}] {self.n}/{self.total} {self.unit}  {elapsed:.0f}s  {stats}".rstrip()

    def update(self, n=1, **stats):
        """Advance by n and show the latest stats (redraws at most every few tenths of a second)."""
        self.n += n
        self.stats.update(stats)
        now = time.perf_counter()
        if self.disable or now - self.last < self.every:
            return
        self.last = now
        self._write()

    def _write(self):
        if self.tty:
            self.stream.write("\r\033[K" + self._line())
        else:
            self.stream.write(self._line() + "\n")
        self.stream.flush()

    def close(self):
        """Draw the final state and end the line."""
        if self.disable:
            return
        if self.tty:
            self._write()
            self.stream.write("\n")
            self.stream.flush()
