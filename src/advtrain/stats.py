"""How much an accuracy measured on n test points and k seeds can be trusted, and whether two methods really differ.

- Wilson's score interval (Wilson 1927; recommended by Newcombe 1998 and Brown, Cai & DasGupta 2001) for an accuracy
  k/n of one model: unlike the normal approximation it stays inside [0, 1] and keeps its coverage near 0 and 1.
- The interval of a mean over seeds (`seeds_interval`): its variance is the test points' part (the variance between
  points of each point's outcome averaged over the seeds, / n) plus the seeds' part (the variance between the seeds'
  accuracies, / k), with Student's t at the Welch-Satterthwaite degrees of freedom. The points are shared by every
  seed, so the spread between seeds alone misses the choice of test points, and the points alone miss the spread
  between training runs. (The point-by-seed noise is counted in both parts: a little conservative.) With one seed
  the seeds' part cannot be estimated, and the interval is the Wilson interval of that seed's points.
- The comparison of two methods on the SAME test points (`sign_flip_test`): each point's difference of outcomes,
  averaged over each method's seeds, and the exact two-sided sign-flip (paired permutation) test of their sum. The
  test point is the unit, counted once however many seeds there are, so the test holds its level with any number of
  seeds; with one seed it is McNemar's exact test. It takes the trained models as given: the spread between
  training runs beyond the seeds run is the intervals' business, not this test's.
- Holm's step-down correction of the p-values of several comparisons (`holm`): the family-wise error rate stays at
  the level whatever the dependence between the tests.
- Mean and sample standard deviation over seeds; per-point outcomes packed as hex bits."""
from __future__ import annotations

import math
from typing import Sequence

Z95 = 1.959963984540054  # the 97.5% quantile of the standard normal


def wilson(accuracy: float, n: int, z: float = Z95) -> tuple[float, float]:
    """The 95% Wilson score interval of an accuracy measured on n points (accuracy = k / n)."""
    if n <= 0:
        return (0.0, 1.0)
    p = accuracy
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (max(0.0, centre - half), min(1.0, centre + half))


def seeds_interval(values: Sequence[float], n: int, point_means: Sequence[float] | None = None) -> tuple[float, float]:
    """The 95% interval of the mean of `values` (one accuracy per seed, each on the same n test points).

    point_means: each test point's outcome averaged over the seeds; without them the points' variance is taken as
    p(1 - p), its upper bound for outcomes in [0, 1]."""
    k = len(values)
    mean = sum(values) / k
    if k == 1 or n < 2:
        return wilson(mean, n)
    if point_means is not None:
        pm = sum(point_means) / len(point_means)
        var_points = sum((v - pm) ** 2 for v in point_means) / (len(point_means) - 1)
    else:
        var_points = mean * (1 - mean)
    a = var_points / n
    b = sum((v - mean) ** 2 for v in values) / (k - 1) / k
    if a + b <= 0:  # every point and every seed the same (e.g. 0%): nothing to estimate a spread from
        return wilson(mean, n)
    df = (a + b) ** 2 / (a * a / (n - 1) + b * b / (k - 1))
    from scipy.stats import t

    half = float(t.ppf(0.975, df)) * math.sqrt(a + b)
    return (max(0.0, mean - half), min(1.0, mean + half))


def sign_flip_p(diffs: Sequence[int]) -> float:
    """Two-sided exact p-value of the sum of integer differences under independent random signs (the paired
    permutation distribution: each pair's two outcomes swapped or not, with probability 1/2).

    The distribution is computed exactly, weight by weight: the points whose |difference| is w add w * (2X - c)
    with X ~ Binomial(c, 1/2); these are convolved. Two-sided as scipy.stats.permutation_test states it:
    2 * min(P(T <= t), P(T >= t)), at most 1."""
    import numpy as np
    from scipy.signal import fftconvolve
    from scipy.special import gammaln

    d = np.asarray(diffs, dtype=np.int64)
    weights = np.abs(d[d != 0])
    if weights.size == 0:
        return 1.0
    observed, total = int(d.sum()), int(weights.sum())
    pmf = np.ones(1)  # pmf[i] = P(T = i - total), once every weight is in
    for w, c in zip(*np.unique(weights, return_counts=True)):
        part = np.zeros(2 * int(w) * int(c) + 1)
        x = np.arange(c + 1)
        part[:: 2 * int(w)] = np.exp(gammaln(c + 1) - gammaln(x + 1) - gammaln(c - x + 1) - c * math.log(2))
        big = pmf.size * part.size > 10_000_000
        pmf = np.clip(fftconvolve(pmf, part), 0, None) if big else np.convolve(pmf, part)
    i = observed + total
    return float(min(1.0, 2 * min(pmf[: i + 1].sum(), pmf[i:].sum())))


def sign_flip_test(a: Sequence[Sequence[bool]], b: Sequence[Sequence[bool]]) -> float:
    """Two methods' per-point outcomes on the same test points, one list per seed (any number of seeds each): the
    exact two-sided sign-flip test of the difference of each point's outcome averaged over the seeds."""
    ka, kb = len(a), len(b)
    n = len(a[0])
    if any(len(s) != n for s in (*a, *b)):
        raise ValueError("the two methods were evaluated on different numbers of test points")
    scale = math.lcm(ka, kb)  # averages over ka and kb seeds as integers: mean_a - mean_b = d / scale
    count_a = [sum(s[i] for s in a) for i in range(n)]
    count_b = [sum(s[i] for s in b) for i in range(n)]
    return sign_flip_p([ca * (scale // ka) - cb * (scale // kb) for ca, cb in zip(count_a, count_b)])


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (Holm 1979), in the order given: the i-th smallest p is multiplied by
    m - i + 1 (i from 1), kept at least as large as the one before it, and capped at 1. Reject where adjusted <
    alpha."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    out = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        out[i] = running
    return out


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts b and c of two models on the same points (one
    seed each). Summing b and c over seeds counts each point once per seed: use sign_flip_test for several seeds."""
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def pack_bits(flags: list[bool]) -> str:
    """Per-point outcomes as a hex string (8 points a byte), small enough for a result JSON."""
    out = bytearray((len(flags) + 7) // 8)
    for i, f in enumerate(flags):
        if f:
            out[i // 8] |= 1 << (i % 8)
    return out.hex()


def unpack_bits(hexed: str, n: int) -> list[bool]:
    data = bytes.fromhex(hexed)
    return [bool(data[i // 8] >> (i % 8) & 1) for i in range(n)]
