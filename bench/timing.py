"""Timing contenders side by side: every speed figure of `ganray bench` is a ratio of contenders
measured in alternation, moments apart, so a shared machine's drift hits them alike.

Standard library only: the suites, the plain loop's GPU rows and `cpu_scaling` all time with it.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Optional, Protocol


class Contender(Protocol):
    """Anything that trains `n_rounds` rounds when asked and says how many images it consumed."""

    def run(self, n_rounds: int) -> int: ...

    def close(self) -> None: ...


def settings_of(contenders: dict[str, Any]) -> dict[str, Any]:
    """Each contender's `settings` (how it was written and run), for the suite's JSON."""
    return {name: dict(getattr(c, "settings", None) or {}) for name, c in contenders.items()}


def close_all(contenders: dict[str, Contender]) -> None:
    for c in contenders.values():
        c.close()


def summary(values: list[float]) -> dict[str, float]:
    """Median and spread (min, max) of repeated measurements."""
    return {"median": float(statistics.median(values)), "min": float(min(values)), "max": float(max(values))}


def alternate(contenders: dict[str, Contender], reps: int, rounds: int, warmup_rounds: int,
              on_rep: Optional[Callable[[int, dict[str, float]], None]] = None) -> dict[str, list[float]]:
    """samples/s of each contender, `reps` times in alternation (each rep runs every contender
    once, in a rotating order so none always follows the same neighbour); warm-up untimed."""
    if warmup_rounds > 0:
        for c in contenders.values():
            c.run(warmup_rounds)
    names = list(contenders)
    out: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps):
        order = names[rep % len(names):] + names[:rep % len(names)]
        this_rep: dict[str, float] = {}
        for name in order:
            t0 = time.perf_counter()
            images = contenders[name].run(rounds)
            dt = time.perf_counter() - t0
            this_rep[name] = images / max(dt, 1e-9)
            out[name].append(this_rep[name])
        if on_rep is not None:
            on_rep(rep, this_rep)
    return out


def paired_ratios(num: list[float], den: list[float]) -> list[float]:
    """Per-repetition ratios: pairs measured moments apart cancel most of a shared machine's drift."""
    return [a / b for a, b in zip(num, den) if b > 0]


def add_ratio(row: dict[str, Any], key: str, num: str, den: str) -> None:
    """row[key] = median of the per-repetition ratios num/den, row[key_range] = [min, max]."""
    ratios = paired_ratios(row["samples_per_s"][num], row["samples_per_s"][den])
    row[key] = float(statistics.median(ratios))
    row[f"{key}_range"] = [float(min(ratios)), float(max(ratios))]


def rounds_for(contender: Contender, target_s: float, lo: int, hi: int) -> int:
    """Rounds that take about `target_s` on `contender`, from an untimed probe that grows until it
    lasts long enough (a fifth of the target) to be measured reliably."""
    probe = max(1, lo)
    while True:
        t0 = time.perf_counter()
        contender.run(probe)
        dt = max(time.perf_counter() - t0, 1e-6)
        if dt >= target_s / 5 or probe >= hi:
            break
        probe = min(hi, probe * 4)
    return int(min(hi, max(lo, round(target_s * probe / dt))))


def compare(cfg: dict[str, Any], contenders: dict[str, Contender], reps: int, target_s: float,
            warmup_rounds: int, reference: str = "plain", max_rounds: int = 10_000,
            size_on: Optional[str] = None) -> dict[str, Any]:
    """One row of figures: every contender against `contenders[reference]`, side by side.

    The number of rounds per repetition is sized on `size_on` (default: the reference) so that it
    lasts `target_s`; every contender then runs that same number of rounds.
    """
    for c in contenders.values():  # warm-up first: the probe below must not time a cold start
        c.run(warmup_rounds)
    rounds = rounds_for(contenders[size_on or reference], target_s, max(1, warmup_rounds), max_rounds)
    samples = alternate(contenders, reps, rounds, warmup_rounds=0)
    row: dict[str, Any] = {"batch": int(cfg["schedule"]["batch_size"]), "rounds_per_rep": rounds, "reps": reps,
                           "reference": reference, "sized_on": size_on or reference,
                           "settings": settings_of(contenders),
                           "samples_per_s": samples, "summary": {k: summary(v) for k, v in samples.items()}}
    for name in samples:
        if name != reference:
            add_ratio(row, f"{name}_ratio", name, reference)
    return row

