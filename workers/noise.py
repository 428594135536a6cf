"""Per-(round, slot) random streams, drawn for the global batch and sliced by rank.

Every topology draws a round's randomness here, so results do not depend on how many workers
drew it: D step k's z, its WGAN-GP interpolation factors and its instance noise, and the G
step's z and instance noise each have a slot of their own within the round.
"""

from __future__ import annotations

from typing import Optional

import torch

from ganray.models.latent import draw_latent

# Stream slots inside one round: D step k draws z from slot k and the WGAN-GP interpolation
# factors from slot ALPHA_SLOT + k; the G step draws z from G_SLOT. Instance noise for D step k
# comes from REAL_NOISE_SLOT + k (real batch) and FAKE_NOISE_SLOT + k (fake batch), and for the
# G step's fakes from G_NOISE_SLOT. The augmentation of D step k's reals draws its parameters
# from AUGMENT_REAL_SLOT + k, of its fakes from AUGMENT_FAKE_SLOT + k, and of the G step's fakes
# from AUGMENT_G_SLOT (workers/augment.py). A conditional GAN draws the classes of D step k's
# fakes from LABEL_SLOT + k and of the G step's fakes from G_LABEL_SLOT, uniformly over classes.
ALPHA_SLOT = 1_000
G_SLOT = 2_000
REAL_NOISE_SLOT = 3_000
FAKE_NOISE_SLOT = 4_000
G_NOISE_SLOT = 5_000
AUGMENT_REAL_SLOT = 6_000
AUGMENT_FAKE_SLOT = 7_000
AUGMENT_G_SLOT = 8_000
LABEL_SLOT = 9_000
G_LABEL_SLOT = 10_000


class NoiseStreams:
    """Per-(round, slot) random streams drawn for the global batch and sliced by rank.

    Seeding a fresh generator per draw makes every draw a pure function of (seed, round, slot),
    so any worker count, restart or resume reproduces the same noise.
    """

    def __init__(self, seed: int, device: torch.device) -> None:
        self.seed = seed
        self.device = device
        # Draw on the worker's own device: a CPU draw plus a copy per step would stall a GPU.
        # (CUDA and CPU streams differ, but every replica of a job shares one device type.)
        self._gen = torch.Generator(device=device)

    def _seed_for(self, round_idx: int, slot: int) -> int:
        # A large odd multiplier keeps (seed, round, slot) triples from colliding in practice.
        return (self.seed * 0x9E3779B97F4A7C15 + round_idx * 1_000_003 + slot) % (2**63 - 1)

    def latent(self, kind: str, round_idx: int, slot: int, shape: tuple[int, ...], part: int,
               parts: int) -> torch.Tensor:
        """z for the global batch from G's latent distribution (models/latent.py), sliced by rank."""
        self._gen.manual_seed(self._seed_for(round_idx, slot))
        return _slice(draw_latent(kind, shape, generator=self._gen, device=self.device), part, parts)

    def uniform(self, round_idx: int, slot: int, n: int, part: int, parts: int) -> torch.Tensor:
        self._gen.manual_seed(self._seed_for(round_idx, slot))
        return _slice(torch.rand((n,), generator=self._gen, device=self.device), part, parts)

    def labels(self, round_idx: int, slot: int, n: int, num_classes: int, part: int,
               parts: int) -> Optional[torch.Tensor]:
        """Classes of the global batch of n fakes, uniform over 0..num_classes-1, sliced by rank;
        None for an unconditional GAN (`num_classes` 0), whose G and D take no classes."""
        if not num_classes:
            return None
        self._gen.manual_seed(self._seed_for(round_idx, slot))
        return _slice(torch.randint(num_classes, (n,), generator=self._gen, device=self.device), part, parts)

    def uniform_rows(self, round_idx: int, slot: int, n: int, columns: int, part: int, parts: int) -> torch.Tensor:
        """(n, columns) uniforms in [0, 1) for the global batch of n rows, sliced by rank."""
        self._gen.manual_seed(self._seed_for(round_idx, slot))
        return _slice(torch.rand((n, columns), generator=self._gen, device=self.device), part, parts)

    def add_noise(self, x: torch.Tensor, std: float, round_idx: int, slot: int, global_batch: int, part: int,
                  parts: int) -> torch.Tensor:
        """`x` (this rank's rows) plus `std` times standard normal noise drawn for the global batch
        and sliced like the rows, so the sum does not depend on how many workers drew it."""
        if std <= 0.0:
            return x
        self._gen.manual_seed(self._seed_for(round_idx, slot))
        full = torch.randn((global_batch, *x.shape[1:]), generator=self._gen, device=self.device)
        return x + std * _slice(full, part, parts).to(x.dtype)

    def noisy_d_inputs(self, real: torch.Tensor, fake: torch.Tensor, std: float, round_idx: int, step: int,
                       global_batch: int, part: int, parts: int) -> tuple[torch.Tensor, torch.Tensor]:
        """D step `step`'s real and fake rows with instance noise, as every topology draws it."""
        return (self.add_noise(real, std, round_idx, REAL_NOISE_SLOT + step, global_batch, part, parts),
                self.add_noise(fake, std, round_idx, FAKE_NOISE_SLOT + step, global_batch, part, parts))


def _slice(full: torch.Tensor, part: int, parts: int) -> torch.Tensor:
    if parts == 1:
        return full
    size = full.shape[0] // parts
    return full[part * size:(part + 1) * size]
