"""Regenerate the erf coefficients in tinyvit/backend.py (a development tool; needs mpmath).

Two ranges: erf(x) = x * Q(x^2) for |x| < 1, and erfc(x) = t * exp(-x^2 + P(t)) with
t = 1 / (1 + x/2) for x >= 1. Each polynomial is a least-squares fit at 50 digits on Chebyshev nodes.
"""
import argparse

import numpy as np


def lsq(f, lo, hi, deg, m, mp):
    """Least-squares power-basis coefficients of f on [lo, hi] at m Chebyshev nodes."""
    nodes = [lo + (hi - lo) * (mp.cos(mp.pi * (2 * i + 1) / (2 * m)) + 1) / 2 for i in range(m)]
    a = mp.matrix(m, deg + 1)
    b = mp.matrix(m, 1)
    for i, t in enumerate(nodes):
        for j in range(deg + 1):
            a[i, j] = t ** j
        b[i] = f(t)
    c = mp.qr_solve(a, b)[0]
    return [float(c[j]) for j in range(deg + 1)]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--deg-small", type=int, default=12, help="degree of Q in x^2 for |x| < 1 (float64: 12, float32: 7)")
    ap.add_argument("--deg-tail", type=int, default=20, help="degree of P in t for |x| >= 1 (float64: 20, float32: 10)")
    ap.add_argument("--nodes", type=int, default=300, help="Chebyshev nodes per fit")
    args = ap.parse_args()
    try:
        import mpmath as mp
    except ImportError:
        raise SystemExit("error: this tool needs mpmath (pip install mpmath)")
    mp.mp.dps = 50

    def q_target(s):  # erf(x) / x as a function of s = x^2
        return 2 / mp.sqrt(mp.pi) if s == 0 else mp.erf(mp.sqrt(s)) / mp.sqrt(s)

    def p_target(t):  # log(erfc(x) / t) + x^2 with x = 2 (1 - t) / t
        if t == 0:
            return mp.log(1 / (2 * mp.sqrt(mp.pi)))
        x = 2 * (1 - t) / t
        return mp.log(mp.erfc(x) / t) + x * x

    q = lsq(q_target, 0, 1, args.deg_small, args.nodes, mp)
    p = lsq(p_target, 0, mp.mpf(2) / 3, args.deg_tail, args.nodes, mp)
    print("Q =", tuple(q))
    print("P =", tuple(p))
    xs = np.linspace(0, 6, 2001)
    t = 1 / (1 + xs / 2)
    tail = 1 - t * np.exp(-xs * xs + np.polyval(p[::-1], t))
    ours = np.where(xs < 1, xs * np.polyval(q[::-1], xs * xs), tail)
    ref = np.array([float(mp.erf(x)) for x in xs])
    print(f"max |erf error| on [0, 6] (float64 evaluation): {np.abs(ours - ref).max():.2e}")


if __name__ == "__main__":
    main()
