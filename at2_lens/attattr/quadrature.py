"""Quadrature rules on [0, 1] for AttAttr's ``n_steps="auto"``: families of rules of growing size, nested or not.

``n_steps="auto"`` evaluates a family's rules in order of size and stops at the first whose completeness error meets
the tolerance. A *nested* family (each rule's nodes contain the previous rule's) pays only for the nodes it adds, so
stopping at a rule of ``n`` nodes costs ``n`` gradient evaluations in all; a family that is not nested pays for every
rule it tried.

Families (``RULES``):

- ``"clenshaw_curtis"`` (the default for ``"auto"``): nodes ``(1 - cos(kπ/n)) / 2``, ``k = 0..n``, for ``n = 2, 4, 8,
  ...`` (``n + 1`` nodes, nested by doubling ``n``), weights that integrate the polynomial interpolating the nodes
  exactly. Its end nodes give ``F(0)`` and ``F(1)`` from passes it makes anyway.
- ``"romberg"``: the trapezoid rule on ``2^m + 1`` equally spaced nodes with Richardson extrapolation over every
  level (nested the same way; the losing candidate, kept for the benchmark).
- ``"gausslegendre"``: Gauss-Legendre with ``4, 8, 16, ...`` nodes, which share no node (each rule is paid in full;
  the rule of the fixed ``n_steps`` path, kept for the benchmark).

Why Clenshaw-Curtis (``benchmarks/bench_attattr_steps.py``, ``benchmarks/results/attattr_steps.md``; SmolLM2, SQuAD
training-split tasks, rtol 1e-3): gradient evaluations to reach the tolerance on layer 0 were 65 / 33 (two tasks)
for Clenshaw-Curtis, 129 / 65 for Romberg and 124 / 124 for Gauss-Legendre doubling; layer 2: 65, 65, 124. The
integrand wiggles near α = 0 on the first layers, so a fixed Gauss-Legendre count is unreliable there too (layer 0
of one task: 0.04 % error at 20 points, 1.1 % at 24 and 0.17 % at 32).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

RULES: tuple[str, ...] = ("clenshaw_curtis", "romberg", "gausslegendre")
"""The rule families ``n_steps="auto"`` can use (``method``); the first is its default."""


@dataclass(frozen=True)
class Rule:
    """One quadrature rule on [0, 1]: ``∫₀¹ g ≈ Σ weights[i] · g(alphas[i])``.

    ``keys`` identify the nodes across the rules of a nested family (a node with the same key is the same point and is
    evaluated once); ``alphas`` are their positions as floats.
    """

    keys: tuple[object, ...]
    alphas: tuple[float, ...]
    weights: tuple[float, ...]

    @property
    def size(self) -> int:
        return len(self.alphas)


def clenshaw_curtis(n: int) -> Rule:
    """Clenshaw-Curtis on [0, 1] with ``n + 1`` nodes (``n >= 1`` intervals), node ``k`` at ``(1 - cos(kπ/n)) / 2``."""
    k = np.arange(n + 1)
    theta = k * math.pi / n
    weights = np.empty(n + 1)
    for i in range(n + 1):
        s = 1.0
        for j in range(1, n // 2 + 1):
            b = 1.0 if 2 * j == n else 2.0
            s -= b * math.cos(2 * j * theta[i]) / (4 * j * j - 1)
        weights[i] = (1.0 if i in (0, n) else 2.0) * s / n
    weights /= 2.0  # from [-1, 1] to [0, 1]
    alphas = 0.5 * (1.0 - np.cos(theta))
    alphas[0], alphas[-1] = 0.0, 1.0
    return Rule(tuple(Fraction(int(i), n) for i in k), tuple(alphas.tolist()), tuple(weights.tolist()))


def romberg(m: int) -> Rule:
    """The trapezoid rule on ``2^m + 1`` equally spaced nodes, Richardson-extrapolated over levels ``0..m``."""
    n = 2**m
    # trapezoid weight vectors of every level on the finest grid, then Romberg's table on those vectors
    table = []
    for level in range(m + 1):
        step = n // 2**level
        w = np.zeros(n + 1)
        w[::step] = 1.0 / 2**level
        w[0] /= 2.0
        w[-1] /= 2.0
        table.append(w)
    for j in range(1, m + 1):
        factor = 4.0**j
        table = [(factor * table[i + 1] - table[i]) / (factor - 1.0) for i in range(len(table) - 1)]
    k = np.arange(n + 1)
    return Rule(tuple(Fraction(int(i), n) for i in k), tuple((k / n).tolist()), tuple(table[0].tolist()))


def gauss_legendre(n: int) -> Rule:
    """Gauss-Legendre with ``n`` nodes on [0, 1] (the nodes and weights Captum's ``"gausslegendre"`` uses)."""
    x, w = np.polynomial.legendre.leggauss(n)
    alphas = 0.5 * (x + 1.0)
    return Rule(tuple(("gl", n, i) for i in range(n)), tuple(alphas.tolist()), tuple((0.5 * w).tolist()))


def family(rule: str, max_nodes: int) -> Iterator[Rule]:
    """The rules of ``rule``'s family in order of size, up to ``max_nodes`` gradient evaluations *in all* (counting
    every rule tried when the family is not nested). The first rule has 5 nodes (Gauss-Legendre: 4), so that a sum
    that happens to match the completeness target at one or two nodes cannot stop the search."""
    spent = 0
    level = 1
    while True:
        level += 1
        if rule == "clenshaw_curtis":
            r = clenshaw_curtis(2**level)
            cost = r.size if spent == 0 else r.size - (2 ** (level - 1) + 1)
        elif rule == "romberg":
            r = romberg(level)
            cost = r.size if spent == 0 else r.size - (2 ** (level - 1) + 1)
        elif rule == "gausslegendre":
            r = gauss_legendre(2**level)
            cost = r.size
        else:  # pragma: no cover - checked by the caller
            raise ValueError(rule)
        if spent + cost > max_nodes:
            return
        spent += cost
        yield r


def max_cost(rule: str, max_nodes: int) -> int:
    """Gradient evaluations of the whole family up to ``max_nodes`` (what a layer that never converges costs)."""
    keys: set[object] = set()
    for r in family(rule, max_nodes):
        keys.update(r.keys)
    return len(keys)


__all__ = ["RULES", "Rule", "clenshaw_curtis", "family", "gauss_legendre", "max_cost", "romberg"]
