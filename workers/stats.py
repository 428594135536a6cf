"""Statistics of a round, named where they are produced (StyleGAN2-ADA's `training_stats.report`).

A phase reports each statistic under its MLflow metric name ("loss/D", "D/real_score", ...),
saying how repeated reports within one round combine (the mean over the D steps, the last one,
or a sum). The coordinator merges the workers' records by name (`merge_replicas`,
`merge_models`, `combine`), and the trainer, Tune and MLflow log every name as it is: nothing
downstream keeps a list of its own. `SKIPPED` counts the optimizer steps of a round skipped for
non-finite gradients; the fault policy reads it by this name.

A lazy regulariser's statistic ("loss/R1", "loss/R2") is its weighted term in D's loss per D
step, 0 on the steps where it is not due: the lazy weight is interval * gamma/2, so its mean over
an interval is the strength of the regulariser as if applied every step.
"""

from __future__ import annotations

from typing import Callable, Literal, Sequence

import torch

SKIPPED = "fault/skipped_steps"
LOSS_D = "loss/D"
LOSS_G = "loss/G"
REAL_SCORE = "D/real_score"
FAKE_SCORE = "D/fake_score"
GRAD_NORM_D = "grad_norm/D"
GRAD_NORM_G = "grad_norm/G"

Reduce = Literal["mean", "last", "sum"]


def term_name(term: str) -> str:
    """The statistic of a loss term of D's step other than the adversarial one ("loss/R1")."""
    return f"loss/{term}"


class RoundStats:
    """One round's statistics on one worker, kept as device tensors (no host sync per round)."""

    def __init__(self) -> None:
        self._values: dict[str, list[torch.Tensor]] = {}
        self._reduce: dict[str, Reduce] = {}

    def report(self, name: str, value: torch.Tensor, reduce: Reduce = "mean") -> None:
        """Add one value of statistic `name`; `reduce` says how the round's values combine."""
        if self._reduce.setdefault(name, reduce) != reduce:
            raise ValueError(f"statistic {name!r} is reported with reductions {self._reduce[name]!r} and {reduce!r}")
        self._values.setdefault(name, []).append(value.detach() if value.requires_grad else value)

    def reduced(self) -> dict[str, torch.Tensor]:
        """Each statistic of the round as one scalar tensor."""
        out: dict[str, torch.Tensor] = {}
        for name, values in self._values.items():
            how = self._reduce[name]
            if how == "last" or len(values) == 1:  # one value is its own mean and sum
                out[name] = values[-1]
            elif how == "sum":
                out[name] = torch.stack(values).sum()
            else:
                out[name] = torch.stack(values).mean()
        return out


def per_round_lists(rounds: Sequence[RoundStats]) -> dict[str, list[float]]:
    """The rounds' statistics as per-round lists of floats, with one device-to-host transfer.

    Every round of a chunk reports the same names (the settings do not change inside a chunk)."""
    if not rounds:
        return {}
    values = [r.reduced() for r in rounds]
    names = list(values[0])
    table = torch.stack([v[n] for v in values for n in names]).float().view(len(values), len(names)).cpu()
    return {n: table[:, i].tolist() for i, n in enumerate(names)}


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values))


def merge_replicas(records: Sequence[dict[str, float]]) -> dict[str, float]:
    """One round's statistics from workers that step one model together (replicas, or the
    generators of a split job): the mean of each, which for averaged gradients is the value of
    the global batch; they skip a step together, so SKIPPED is their common count."""
    return {name: _mean([r[name] for r in records]) for name in records[0]}


def merge_models(records: Sequence[dict[str, float]]) -> dict[str, float]:
    """One round's statistics from workers that each step a model of their own (a split job's
    discriminators): the mean of each over the workers that report it (a statistic of one
    model's own, such as "augment/p/d1", comes from that worker alone), but SKIPPED summed,
    since every skipped step is its own."""
    names = dict.fromkeys(name for record in records for name in record)
    out = {name: _mean([r[name] for r in records if name in r]) for name in names}
    if SKIPPED in out:
        out[SKIPPED] = float(sum(r[SKIPPED] for r in records))
    return out


def combine(*parts: dict[str, float]) -> dict[str, float]:
    """The statistics of different networks in one round (D's and G's): their union, SKIPPED added."""
    out: dict[str, float] = {}
    for part in parts:
        for name, value in part.items():
            out[name] = out.get(name, 0.0) + value if name == SKIPPED else value
    return out


def merge_chunks(chunks: Sequence[dict[str, list[float]]],
                 merge: Callable[[Sequence[dict[str, float]]], dict[str, float]]) -> dict[str, list[float]]:
    """Per-round lists from several workers merged round by round with `merge`."""
    if not chunks or not chunks[0]:
        return {}
    n = len(next(iter(chunks[0].values())))
    merged = [merge([{k: c[k][i] for k in c} for c in chunks]) for i in range(n)]
    return {name: [m[name] for m in merged] for name in merged[0]} if merged else {}
