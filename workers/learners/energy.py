"""The discriminator alone: the `energy` learner (the search and the loss in models/energy.py).

D has no generator to supply its negatives, so it makes its own: each round a Langevin search
up D's score (its approximate argmax) continues from negatives kept in a replay buffer, or,
with probability `model.energy_reinit`, starts afresh from the box (Du & Mordatch 2019). D then
raises the real batch's score and lowers the negatives', and the buffer keeps the negatives for
later rounds, so every chain grows longer over training and D repairs, one by one, the places
where its searches end but no data lie.

| phase    | network | optimizer | loss terms                                                  |
|----------|---------|-----------|-------------------------------------------------------------|
| `search` | D       | none      | none: `energy_steps` Langevin steps from the buffer/box     |
| `D`      | D       | opt_D     | contrastive (negatives minus reals), score regulariser      |
| `D_ema`  | D_ema   | none      | none: D_ema, the D that samples search, moves towards D     |
| `replay` | buffer  | none      | none: the negatives replace the buffer entries they came from|

Every random draw (buffer picks, restarts, fresh starts, each step's noise) comes from the
per-round streams, drawn for the global batch and sliced by rank; the buffer is the same on
every replica (the negatives are gathered through the averaging hook before they go back) and
is checkpoint state, so `local` = `replicated(1)` and resume is exact. The learning rate is
`schedule.d_lr` (D is a critic).
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from torch import nn

from ganray.models.ema import EmaPair, ema_beta
from ganray.models.energy import EnergySampler, SearchSettings, energy_loss, langevin_search, start_range_of
from ganray.models.errors import ConfigError
from ganray.models.registry import build_discriminator
from ganray.workers.learners.base import LearnerStepper
from ganray.workers.phases import Phase, RoundTable, Term
from ganray.workers.stats import FAKE_SCORE, LOSS_D, REAL_SCORE, RoundStats

CONTRASTIVE, SCORE_REG = "contrastive", "score_reg"
START_SCORE = "energy/start_score"          # D's mean score on the search's starts
EVALS_PER_SAMPLE = "energy/evals_per_sample"  # D evaluations (score and input gradient) per negative
REINIT_FRACTION = "energy/reinit_fraction"  # share of this round's searches that started afresh

# Stream slots within a round (the autoencoders use 10_000): the buffer picks, the restart
# coin, the fresh starts, and step k's noise at STEP_NOISE_SLOT + k. The buffer's initial
# contents come from BUFFER_INIT_SLOT of round 0.
PICK_SLOT, REINIT_SLOT, FRESH_SLOT, BUFFER_INIT_SLOT = 20_000, 20_001, 20_002, 20_003
STEP_NOISE_SLOT = 30_000

# Rows of the training set read to measure the start box (evenly spaced, the same in every replica).
RANGE_PROBE_ROWS = 4096


class ReplayBuffer(nn.Module):
    """Past negatives, a buffer (so checkpoints, resume and group broadcasts carry it)."""

    def __init__(self, entries: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("entries", entries)

    def __len__(self) -> int:
        return int(self.entries.shape[0])


def measured_start_range(source: Any) -> float:
    """The start box's half-width from the training data (models/energy.py `start_range_of`): the
    whole set when it is one tensor in memory, else evenly spaced rows."""
    data = getattr(source, "data", None)
    if not isinstance(data, torch.Tensor):
        n = len(source)
        data = source.get(np.unique(np.linspace(0, n - 1, min(n, RANGE_PROBE_ROWS)).astype(np.int64)))
    return start_range_of(data)


class EnergyStepper(LearnerStepper):
    """`model.learner: energy`: D trained against its own Langevin-searched negatives."""

    name = "energy"

    def build(self) -> None:
        cfg, shape = self.model_cfg, self.sample_shape
        B = self.settings.global_batch
        size = int(cfg["energy_buffer"])
        if size < B:
            raise ConfigError(f"model.energy_buffer ({size}) must be at least schedule.batch_size ({B}): "
                              "each round's searches continue from distinct buffer entries")
        self.search = SearchSettings.from_model_config(cfg)
        self.reinit = float(cfg["energy_reinit"])
        self.reg = float(cfg["energy_reg"])
        self.D = build_discriminator(cfg, shape).to(self.device)
        # Samples search an average of D's recent weights (as the GAN samples G_ema): the live D
        # moves every round to chase its own negatives, and a long search on it ends wherever
        # the latest round left a bump; the average's landscape is the one D has settled on.
        self.D_ema = copy.deepcopy(self.D).eval().requires_grad_(False)
        self.ema = EmaPair(self.D_ema, self.D)
        self.ema_beta = ema_beta(self.settings.global_batch, self.settings.ema_half_life_kimg)
        self.sampler_module = EnergySampler(self.D_ema, shape, SearchSettings.from_model_config(cfg, sampling=True),
                                            measured_start_range(self.source)).to(self.device)
        self.start_range = float(self.sampler_module.start_range)
        # The buffer starts as fresh starts, a pure function of the seed (every replica the same).
        init = self.noise.uniform_rows(0, BUFFER_INIT_SLOT, size, self.features, 0, 1)
        self.buffer = ReplayBuffer(self._to_box(init).reshape(size, *shape)).to(self.device)
        self.add_optimizer("D", self.D.parameters(), "d_lr")

    @property
    def features(self) -> int:
        return int(np.prod(self.sample_shape))

    def _to_box(self, uniform01: torch.Tensor) -> torch.Tensor:
        return (uniform01 * 2.0 - 1.0) * self.start_range

    def networks(self) -> dict[str, nn.Module]:
        return {"D": self.D, "D_ema": self.D_ema, "replay": self.buffer}

    def table(self) -> RoundTable:
        return RoundTable((Phase("search", "D", None),
                           Phase("D", "D", "opt_D", (Term(CONTRASTIVE), Term(SCORE_REG, self.reg))),
                           Phase("D_ema", "D_ema", None), Phase("replay", "buffer", None)))

    def sampling_module(self) -> nn.Module:
        return self.sampler_module

    def averaged_numel(self) -> int:
        """The gathered negatives of a round (`_gather`): the global batch's samples."""
        return self.settings.global_batch * self.features

    # -- the round ---------------------------------------------------------------------------
    def _rows(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a tensor drawn for the global batch."""
        size = full.shape[0] // self.world
        return full[self.rank * size:(self.rank + 1) * size]

    def _starts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(global buffer picks, this rank's starts, this rank's restart mask) for this round."""
        r, B, w = self.progress.rounds, self.settings.global_batch, self.world
        # Distinct picks (the first B of a random order), so no two searches write one entry.
        order = self.noise.uniform(r, PICK_SLOT, len(self.buffer), 0, 1)
        picks = torch.argsort(order)[:B]
        restart = self.noise.uniform(r, REINIT_SLOT, B, self.rank, w) < self.reinit
        fresh = self._to_box(self.noise.uniform_rows(r, FRESH_SLOT, B, self.features, self.rank, w))
        kept = self.buffer.entries[self._rows(picks)]
        starts = torch.where(restart.view(-1, *([1] * len(self.sample_shape))),
                             fresh.view(-1, *self.sample_shape), kept)
        return picks, starts, restart

    def _gather(self, rows: torch.Tensor) -> torch.Tensor:
        """The global batch's rows from every rank's part (through the averaging hook: each rank
        contributes its rows and zeros elsewhere, so the mean times the world is the whole)."""
        if self.world == 1:
            return rows
        size = rows.shape[0]
        full = torch.zeros((size * self.world, *rows.shape[1:]), dtype=rows.dtype, device=rows.device)
        full[self.rank * size:(self.rank + 1) * size] = rows
        self.average([full])
        return full * self.world

    def round(self, stats: RoundStats) -> None:
        picks, starts, restart = self._starts()

        def noise_for_step(k: int) -> torch.Tensor:
            return self.normal(STEP_NOISE_SLOT + k, self.sample_shape)

        with torch.no_grad():
            start_score = self.D(starts).mean()
        # The search phase: D's approximate argmax from the starts (D itself does not move).
        negatives = langevin_search(self.D, starts, self.search, self.start_range, noise_for_step)
        # The D phase.
        real = self.real_batch()
        real_score, neg_score = self.D(real), self.D(negatives)
        loss = energy_loss(real_score, neg_score, self.reg)
        loss.backward()
        self.step("D", stats)
        self.ema.update(self.ema_beta)
        # The replay phase: this round's negatives replace the entries they started from.
        self.buffer.entries[picks] = self._gather(negatives)
        stats.report(LOSS_D, loss.detach())
        stats.report(REAL_SCORE, real_score.detach().mean())
        stats.report(FAKE_SCORE, neg_score.detach().mean())
        stats.report(START_SCORE, start_score)
        stats.report(REINIT_FRACTION, restart.float().mean())
        stats.report(EVALS_PER_SAMPLE, torch.tensor(float(self.search.steps), device=self.device), "last")
