"""The discriminator alone: D as an energy function that generates by searching its own score.

With no generator, D's negatives are its own approximate argmax: Langevin dynamics on D's
score, u <- clamp(u + step_size * grad_u D + noise * eps, -1, 1), from random starts (Du &
Mordatch 2019, "Implicit Generation and Generalization in Energy-Based Models"; their energy is
E = -D). The search runs in the coordinates u = x / start_range of the start box, so one step
size and noise suit data of any spread (ring8's radius 1, grid25's 4, images in [-1, 1]).
D's loss raises the score of real samples, lowers that of the search's results, and keeps both
scores small so the landscape cannot run off to infinity:

    loss = mean D(x-) - mean D(x+) + reg * (mean D(x+)^2 + mean D(x-)^2)

Every search step costs one evaluation of D and its input gradient, so a sample costs `steps` D
evaluations where a generator costs one pass: the price of generating by argmax.

`EnergySampler` is the z -> x module that the orchestrator samples, evaluates and releases like
a generator: it holds a D (the learner gives it its moving average of D, as the GAN samples
G_ema), the search settings and the box the starts are drawn from, and its forward runs the
search from starts read off z. Plain torch: the learner that trains D lives in
workers/learners/energy.py.
"""

from __future__ import annotations

import hashlib
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

# The search's defaults, mirrored by ModelConfig's energy_* keys (models is the bottom layer and
# cannot import the config); partial dicts (tests, notebooks) get the same search as a full config.
DEFAULT_STEPS = 40
DEFAULT_STEP_SIZE = 0.01
DEFAULT_NOISE = 0.001

# Starts are uniform over the box [-start_range, start_range]^d: the data's largest coordinate
# magnitude times this margin, so every mode lies inside the box with room around it.
START_MARGIN = 1.25
# The replay buffer's restart probability (Du & Mordatch's 5%); mirrored by model.energy_reinit.
DEFAULT_REINIT = 0.05


@dataclass(frozen=True)
class SearchSettings:
    """Langevin search: `steps` updates of size `step_size` along grad_u D with Gaussian `noise`
    (both in the start box's unit coordinates u)."""

    steps: int = DEFAULT_STEPS
    step_size: float = DEFAULT_STEP_SIZE
    noise: float = DEFAULT_NOISE

    @classmethod
    def from_model_config(cls, model_cfg: Mapping[str, Any], sampling: bool = False) -> "SearchSettings":
        """The training search (`model.energy_steps`), or with `sampling` the search that makes
        samples: `model.energy_sample_steps` steps, by default `sample_steps_default`."""
        steps = int(model_cfg.get("energy_steps", DEFAULT_STEPS))
        if sampling:
            given = model_cfg.get("energy_sample_steps")
            steps = int(given) if given is not None else sample_steps_default(
                steps, float(model_cfg.get("energy_reinit", DEFAULT_REINIT)))
        return cls(steps=steps, step_size=float(model_cfg.get("energy_step_size", DEFAULT_STEP_SIZE)),
                   noise=float(model_cfg.get("energy_noise", DEFAULT_NOISE)))


def sample_steps_default(steps: int, reinit: float) -> int:
    """The steps of a sample's search when `model.energy_sample_steps` is unset: the mean length
    of the chains behind the training negatives. A negative continues a buffer entry, and an
    entry is restarted with probability `reinit` per pick, so its chain has run steps / reinit
    steps on average: D has learned the landscape those chains see, not the one a fresh chain of
    `steps` sees. (No restarts, reinit 0: ten times the training search.)"""
    return max(steps, round(steps / reinit)) if reinit > 0 else 10 * steps


@contextmanager
def _frozen_eval(D: nn.Module) -> Iterator[None]:
    """D in eval mode with its parameters out of the graph while the search runs: the search
    moves samples, never D (and eval mode keeps spectral norm's power iteration still)."""
    was_training = D.training
    flags = [p.requires_grad for p in D.parameters()]
    D.eval()
    D.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(D.parameters(), flags):
            p.requires_grad_(flag)
        D.train(was_training)


def langevin_search(D: nn.Module, starts: torch.Tensor, settings: SearchSettings, start_range: torch.Tensor | float,
                    noise_for_step: Callable[[int], torch.Tensor]) -> torch.Tensor:
    """`settings.steps` Langevin steps up D's score from `starts`; returns the final samples.

    `noise_for_step(k)` gives step k's standard normal noise with the shape of `starts` (the
    learner draws it from the per-round streams, the sampler from z). Samples are kept inside
    the start box, the region D is trained on. Gradients are enabled inside, so the search runs
    under an outer `no_grad` (evaluation) too; D's own gradients are left untouched.

    In x = R u (R the box's half-width) the step is x + step_size R^2 grad_x D + noise R eps,
    which is the unit-box step written in data coordinates.
    """
    limit = float(start_range)
    step, spread = settings.step_size * limit * limit, settings.noise * limit
    # inference_mode(False): starts made under inference mode must become ordinary tensors to
    # take a gradient.
    with torch.inference_mode(False), torch.enable_grad(), _frozen_eval(D):
        x = starts.detach().clone()
        for k in range(settings.steps):
            x.requires_grad_(True)
            (grad,) = torch.autograd.grad(D(x).sum(), x)
            with torch.no_grad():
                x = x + step * grad
                if spread > 0:
                    x = x + spread * noise_for_step(k).to(x.dtype)
                # A non-finite score gradient must not poison the replay buffer for good.
                x = torch.nan_to_num(x, nan=0.0).clamp(-limit, limit)
        return x.detach()


def energy_loss(real_score: torch.Tensor, neg_score: torch.Tensor, reg: float) -> torch.Tensor:
    """Du & Mordatch's contrastive loss in scores (E = -D) with their score-magnitude regulariser."""
    return neg_score.mean() - real_score.mean() + reg * (real_score.pow(2).mean() + neg_score.pow(2).mean())


def start_range_of(data: torch.Tensor) -> float:
    """The start box's half-width for samples like `data`: its largest |coordinate| with a margin."""
    return float(data.detach().abs().max()) * START_MARGIN


def build_energy_sampler(model_cfg: Mapping[str, Any], sample_shape: Sequence[int]) -> "EnergySampler":
    """The untrained sampling module for `model.learner: energy` (models/registry.py builds it for
    evaluation and loads the saved state: D's weights and the start box)."""
    from ganray.models.registry import build_discriminator  # registry imports this module at its end

    return EnergySampler(build_discriminator(model_cfg, tuple(sample_shape)), sample_shape,
                         SearchSettings.from_model_config(model_cfg, sampling=True))


def _seed_of(z: torch.Tensor) -> int:
    """A seed that is a pure function of the batch z (its bytes), so sampling is deterministic."""
    digest = hashlib.sha256(z.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()).digest()
    return int.from_bytes(digest[:8], "little") % (2**63 - 1)


class EnergySampler(nn.Module):
    """z -> x by the search on D's score: the energy learner's "generator".

    z ~ U(-1, 1)^d with d the sample's size (`latent` "uniform", `z_dim` d) is the start,
    scaled to the box; the search's noise is seeded from z's bytes, so the same z always gives
    the same samples. `evals_per_sample` is the D evaluations (score and input gradient) each
    sample costs. The state dict is D's weights (under `D.`) and the start box (`start_range`);
    the search settings come from the config.
    """

    latent = "uniform"

    def __init__(self, D: nn.Module, sample_shape: Sequence[int], settings: SearchSettings,
                 start_range: float = 1.0) -> None:
        super().__init__()
        self.D = D
        self.sample_shape = tuple(int(s) for s in sample_shape)
        self.z_dim = math.prod(self.sample_shape)
        self.settings = settings
        self.register_buffer("start_range", torch.tensor(float(start_range)))

    @property
    def evals_per_sample(self) -> int:
        return self.settings.steps

    def starts(self, z: torch.Tensor) -> torch.Tensor:
        """The search's starts for uniform z: z scaled to the box, shaped like samples."""
        return z.reshape(z.shape[0], *self.sample_shape) * self.start_range

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        starts = self.starts(z)
        gen = torch.Generator(device=starts.device).manual_seed(_seed_of(z))

        def noise_for_step(_: int) -> torch.Tensor:
            return torch.randn(starts.shape, generator=gen, device=starts.device)

        return langevin_search(self.D, starts, self.settings, self.start_range, noise_for_step)
