"""The adversarial round as data: its phases, derived from the settings, and the progress counters.

Like StyleGAN2-ADA's `phases` list (training_loop.py), a round is a table of phases, each with
its network, its optimizer and its loss terms; a term with an interval is lazy, due on the D
steps whose global index is a multiple of it. `round_table` builds the table from the settings
(it is rebuilt each round, so a mutated `n_critic` or `r1_gamma` takes effect at once):

| phase         | network | optimizer | loss terms (see `phase_loss.py`)                    |
|---------------|---------|-----------|-----------------------------------------------------|
| `D0` .. `Dn-1`| D       | opt_D     | adversarial (real half, fake half), GP (wgan-gp),   |
|               |         |           | R1 and R2 every `r1_interval` D steps when on       |
| `G`           | G       | opt_G     | adversarial (relativistic: paired with the reals of |
|               |         |           | the last D step, re-scored by the updated D)        |
| `G_ema`       | G_ema   | none      | none: G_ema moves towards G                         |

With `augment.kind` other than none, the D phases and the G phase are `augment`ed: every input
of D, real and fake, passes through the augmentation first (`augment.py`); with `ada` each D
phase also carries the `adapt` step, due after the D steps whose global count is a multiple of
`augment.interval`: it moves p by its weight (ADA's step) up or down by r_t = E[sign(D(real))].

Every topology runs this table; how it runs it (all-reduces behind the next phase's compute in
`replicated`, the phases spread over actors in `split`) is the topology's own business.
`Progress` is the one place that counts rounds, real images and D steps.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Optional

from ganray.workers.augment import AugmentSettings
from ganray.workers.settings import Hyper

ADVERSARIAL = "adversarial"
GP, R1, R2 = "GP", "R1", "R2"
ADAPT = "adapt"


@dataclass(frozen=True)
class Term:
    """One loss term of a phase: `weight` multiplies the unweighted term; with `interval` > 1
    the term is lazy (due on global D steps that are multiples of it, weighted by the interval)."""

    name: str
    weight: float = 1.0
    interval: int = 1

    def due(self, d_step: int) -> bool:
        return d_step % self.interval == 0


@dataclass(frozen=True)
class Phase:
    """One row of the table. `step` is the D step's index within the round (noise slots);
    `augment`: D's inputs pass through the augmentation; `adapt`: ADA's p step (D phases, ada)."""

    name: str
    network: str
    optimizer: Optional[str]
    terms: tuple[Term, ...] = ()
    step: int = 0
    augment: bool = False
    adapt: Optional[Term] = None

    def term(self, name: str) -> Optional[Term]:
        return next((t for t in self.terms if t.name == name), None)


@dataclass(frozen=True)
class RoundTable:
    """A round's phases in order: the D steps, the G step, the EMA update."""

    phases: tuple[Phase, ...]

    @property
    def d_steps(self) -> tuple[Phase, ...]:
        return tuple(p for p in self.phases if p.network == "D")

    @property
    def g_step(self) -> Phase:
        return next(p for p in self.phases if p.network == "G")

    def images(self, global_batch: int) -> int:
        """Real images a round consumes: one global batch per D step (the G step reads none)."""
        return len(self.d_steps) * global_batch


def round_table(loss_kind: str, r1_interval: int, gp_weight: float, hyper: Hyper,
                augment: Optional[AugmentSettings] = None, global_batch: int = 0) -> RoundTable:
    """The phases of one round for these loss settings, the current hyperparameters and the
    augmentation (`global_batch` sets ADA's p step)."""
    d_terms = [Term(ADVERSARIAL)]
    if loss_kind == "wgan-gp" and gp_weight > 0:
        d_terms.append(Term(GP, gp_weight))
    # Lazy regularisation (StyleGAN2): every r1_interval D steps, scaled by the interval so the
    # expected strength matches applying it every step.
    for name, gamma in ((R1, hyper.r1_gamma), (R2, hyper.r2_gamma)):
        if gamma > 0:
            d_terms.append(Term(name, (gamma / 2.0) * r1_interval, r1_interval))
    augmented = augment is not None and augment.enabled
    adapt = None
    if augmented and augment.adaptive:
        # Due after D steps whose count is a multiple of the interval: `Term.due(d_steps_done)`.
        adapt = Term(ADAPT, augment.p_step(global_batch), augment.interval)
    d_steps = tuple(Phase(f"D{k}", "D", "opt_D", tuple(d_terms), step=k, augment=augmented, adapt=adapt)
                    for k in range(int(hyper.n_critic)))
    g_step = Phase("G", "G", "opt_G", (Term(ADVERSARIAL),), augment=augmented)
    return RoundTable((*d_steps, g_step, Phase("G_ema", "G_ema", None)))


def table_of(settings: Any) -> RoundTable:
    """`round_table` for a `StepSettings`, built once per distinct value of what it reads (every
    round asks, and a mutated `n_critic` or `r1_gamma` must take effect at once)."""
    h = settings.hyper
    return _cached_table(settings.loss_kind, settings.r1_interval, settings.gp_weight, h.n_critic, h.r1_gamma,
                         h.r2_gamma, settings.augment, settings.global_batch)


@functools.lru_cache(maxsize=64)
def _cached_table(loss_kind: str, r1_interval: int, gp_weight: float, n_critic: int, r1_gamma: float,
                  r2_gamma: float, augment: Optional[AugmentSettings], global_batch: int) -> RoundTable:
    # round_table reads only these fields of Hyper; the learning rates and betas do not shape it.
    hyper = Hyper(g_lr=0.0, d_lr=0.0, betas=(0.0, 0.0), n_critic=n_critic, r1_gamma=r1_gamma, r2_gamma=r2_gamma)
    return round_table(loss_kind, r1_interval, gp_weight, hyper, augment, global_batch)


@dataclass
class Progress:
    """Rounds completed, real images consumed (all workers together) and D steps taken, counted
    the same way by every holder (a replica, each split actor, the split driver)."""

    rounds: int = 0
    images_seen: int = 0
    d_steps: int = 0

    @property
    def kimg(self) -> float:
        return self.images_seen / 1000.0

    def end_round(self, table: RoundTable, global_batch: int) -> None:
        self.rounds += 1
        self.images_seen += table.images(global_batch)

    def state(self) -> dict[str, int]:
        return {"rounds": self.rounds, "images_seen": self.images_seen, "d_steps": self.d_steps}

    def load(self, state: dict[str, Any]) -> None:
        self.rounds, self.images_seen = int(state["rounds"]), int(state["images_seen"])
        self.d_steps = int(state["d_steps"])
