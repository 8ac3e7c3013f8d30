"""How much an accuracy measured on n test points can be trusted, and whether two methods really differ.

- Wilson's score interval (Wilson 1927; recommended by Newcombe 1998 and Brown, Cai & DasGupta 2001) for an accuracy
  k/n: unlike the normal approximation it stays inside [0, 1] and keeps its coverage near 0 and 1.
- McNemar's exact test for two models evaluated on the SAME points: only the points on which they disagree carry
  information (b: robust for the first model only, c: for the second only); under "no difference" b ~ Bin(b + c, 1/2).
- Mean and sample standard deviation over seeds."""
from __future__ import annotations

import math

Z95 = 1.959963984540054  # the 97.5% quantile of the standard normal


def wilson(accuracy: float, n: int, z: float = Z95) -> tuple[float, float]:
    """The 95% Wilson score interval of an accuracy measured on n points (accuracy = k / n)."""
    if n <= 0:
        return (0.0, 1.0)
    p = accuracy
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (max(0.0, centre - half), min(1.0, centre + half))


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts b and c."""
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
