"""benchmark.py --memory's arithmetic (tinyvit/cli/commands/bench_memory.py); its runs are in test_scripts.py."""
from tinyvit.cli.commands.bench_memory import largest_batch


def test_largest_batch_is_read_off_the_line_through_the_peaks():
    assert largest_batch([(8, 1000.0), (16, 1800.0)], 8) == (8192 - 200) // 100
    assert largest_batch([(8, 1000.0), (16, 1800.0), (32, 3400.0)], 16) == (16384 - 200) // 100
    assert largest_batch([(8, 1000.0)], 8) is None  # one point draws no line
