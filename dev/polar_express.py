"""
Derive the "Polar Express" Newton–Schulz coefficients that nanochat/optim.py uses (Amsel et al.,
2025, "The Polar Express": at each iteration, the odd quintic closest to 1 in the max norm over
the interval where the singular values may then lie).

Muon divides the update by its Frobenius norm (times a small cushion), so its singular values lie
in (0, 1]; those below ~1e-3 of the largest carry little of the update. Iteration k takes the
interval [l, u] to [min p, max p] of its minimax quintic p, found by the Remez exchange: p
equioscillates about 1 at four points (the two ends and two interior extrema).

Each quintic is fit over [l, 1.01 u] rather than [l, u] (the paper's safety factor). In bf16, as
Muon runs on GPU, rounding pushes some singular values a little past u, and past the end of its
interval a quintic this steep sends them far from 1 (fit to [l, u] exactly, the iteration ends
with singular values up to ~90 in bf16); the 1% costs a slightly wider final band.

    python dev/polar_express.py     # prints the table of (a, b, c) per iteration
"""

import numpy as np


def minimax_odd_quintic(lo, hi, iterations=60):
    """(a, b, c) of the p(x) = a x + b x^3 + c x^5 that minimises max |1 - p(x)| on [lo, hi], and
    the range of p there."""
    grid = np.geomspace(lo, hi, 200_001)
    points = np.geomspace(lo, hi, 4)
    for _ in range(iterations):
        system = np.stack([points, points**3, points**5, (-1.0) ** np.arange(4)], axis=1)
        a, b, c, _ = np.linalg.solve(system, np.ones(4))  # p(x_i) + (-1)^i E = 1
        error = 1 - (a * grid + b * grid**3 + c * grid**5)
        slope = np.diff(error)
        turns = np.nonzero(slope[:-1] * slope[1:] < 0)[0] + 1
        extrema = np.concatenate([[0], turns, [len(grid) - 1]])
        if len(extrema) != 4 or np.allclose(grid[extrema], points, rtol=1e-12):
            break
        points = grid[extrema]
    p = a * grid + b * grid**3 + c * grid**5
    return (a, b, c), (p.min(), p.max())


def polar_express(steps=5, smallest=1e-3, safety=1.01):
    """The coefficients of `steps` iterations for singular values in [smallest, 1], each quintic
    fit over its interval stretched by `safety` at the top."""
    coefficients, (lo, hi) = [], (smallest, 1.0)
    for _ in range(steps):
        abc, (lo, hi) = minimax_odd_quintic(lo, safety * hi)
        coefficients.append(abc)
    return coefficients, (lo, hi)


if __name__ == "__main__":
    coefficients, (lo, hi) = polar_express()
    for a, b, c in coefficients:
        print(f"({a:.6f}, {b:.6f}, {c:.6f}),")
    print(f"singular values in [1e-3, 1] end in [{lo:.4f}, {hi:.4f}]")
