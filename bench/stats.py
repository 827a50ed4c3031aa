"""Robust summaries of interleaved samples: medians, quartiles, paired bootstrap intervals.

Rounds are the unit of resampling: within a round every variant ran once, close together in
time, so noise that drifts over the run (other tenants, frequency changes) stays paired.
"""

from __future__ import annotations

import logging
import random
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

log = logging.getLogger(__name__)

BOOTSTRAP_RESAMPLES = 2000
CONFIDENCE = 0.95


def interleaved(variants: Sequence, rounds: int, budget_s: float, min_rounds: int,
                seed: int) -> Iterator[tuple[int, list]]:
    """(round, the variants in this round's order): every round runs every variant once, in a
    fresh random order, so that a slow spell of the machine spreads over all of them. Stops
    after ``rounds``, or once ``budget_s`` is spent and at least ``min_rounds`` have run."""
    rng = random.Random(seed)
    deadline = time.monotonic() + budget_s
    for r in range(rounds):
        if r >= min(min_rounds, rounds) and time.monotonic() > deadline:
            log.info("time budget of %.0f s spent: stopping after %d rounds", budget_s, r)
            return
        order = list(variants)
        rng.shuffle(order)
        yield r, order


@dataclass(frozen=True)
class Summary:
    n: int
    median: float
    p25: float
    p75: float
    minimum: float
    maximum: float


def summarize(xs: Sequence[float]) -> Summary:
    if not xs:
        raise ValueError("no samples")
    if len(xs) == 1:
        q1 = q3 = xs[0]
    else:
        q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return Summary(len(xs), statistics.median(xs), q1, q3, min(xs), max(xs))


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float


def bootstrap(rounds: Sequence[Mapping[str, float]], stat: Callable[[Sequence[Mapping[str, float]]], float],
              seed: int = 1) -> Interval:
    """stat over the rounds, with a percentile interval from resampling whole rounds."""
    estimate = stat(rounds)
    if len(rounds) < 2:
        return Interval(estimate, estimate, estimate)
    rng = random.Random(seed)
    draws = sorted(stat(rng.choices(rounds, k=len(rounds))) for _ in range(BOOTSTRAP_RESAMPLES))
    tail = (1 - CONFIDENCE) / 2
    lo = draws[int(tail * (len(draws) - 1))]
    hi = draws[int((1 - tail) * (len(draws) - 1))]
    return Interval(estimate, lo, hi)


def added(variant: str, baseline: str) -> Callable[[Sequence[Mapping[str, float]]], float]:
    """median(variant) - median(baseline) over a set of rounds."""
    def stat(rounds):
        return (statistics.median(r[variant] for r in rounds)
                - statistics.median(r[baseline] for r in rounds))
    return stat


def paired_added(variant: str, baseline: str) -> Callable[[Sequence[Mapping[str, float]]], float]:
    """median over rounds of (variant - baseline): each difference is taken within one round,
    so a slow spell of the machine that spans a round cancels out."""
    def stat(rounds):
        return statistics.median(r[variant] - r[baseline] for r in rounds)
    return stat


def ratio(num: Callable[[Sequence[Mapping[str, float]]], float],
          den: Callable[[Sequence[Mapping[str, float]]], float]
          ) -> Callable[[Sequence[Mapping[str, float]]], float]:
    """num / den of two added-cost statistics; inf when den adds nothing."""
    def stat(rounds):
        d = den(rounds)
        return num(rounds) / d if d > 0 else float("inf")
    return stat

