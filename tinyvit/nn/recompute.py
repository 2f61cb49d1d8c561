"""Activation checkpointing's random draws: a block recomputed in the backward draws the same dropout and
drop-path masks as its forward did. On NumPy the generator's state before the block is kept (a few
bytes) and a generator restored from it draws them again; another generator (CuPy's) is read through a
tape that keeps the block's uniform draws, handed back in order at the recompute."""
import numpy as np


class _Tape:
    """A generator seen through a record of its draws (the only call the layers make: random)."""

    def __init__(self, rng):
        self.rng, self.draws = rng, []

    def random(self, size=None, dtype=np.float64):
        """rng.random, kept."""
        r = self.rng.random(size, dtype=dtype)
        self.draws.append(r)
        return r


class _Replay:
    """A tape's draws handed back in the order they were drawn."""

    def __init__(self, draws):
        self.draws = iter(draws)

    def random(self, size=None, dtype=np.float64):
        """The next draw the tape kept (same shape and dtype as asked then)."""
        return next(self.draws)


def mark(rng):
    """(the generator a block's forward draws from, the record replay() draws the same from again); the
    record is None without a generator."""
    if rng is None:
        return None, None
    if isinstance(rng, np.random.Generator):
        return rng, (type(rng.bit_generator), rng.bit_generator.state)
    tape = _Tape(rng)
    return tape, tape


def replay(record):
    """A generator that draws what the generator mark() saw drew next (None for no record)."""
    if record is None:
        return None
    if isinstance(record, _Tape):
        return _Replay(record.draws)
    kind, state = record
    bits = kind()
    bits.state = state
    return np.random.Generator(bits)
