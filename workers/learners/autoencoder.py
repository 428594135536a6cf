"""The generator alone: the `ae` and `vae` learners (networks in models/autoencoders.py, models/vae.py).

Their round tables, one phase that reads a real batch and one optimizer over encoder and decoder:

| learner | phase   | network        | optimizer | loss terms                                        |
|---------|---------|----------------|-----------|---------------------------------------------------|
| `ae`    | `AE`    | encoder+decoder| opt_AE    | reconstruction (mean squared error, standardised) |
|         | `codes` | code Gaussian  | none      | none: running mean and E[c c^T] of the batch codes|
| `vae`   | `VAE`   | encoder+decoder| opt_VAE   | reconstruction (Gaussian NLL), KL to N(0, I)      |

The learning rate is `schedule.g_lr` (they are generators). Replicas average gradients, and the
`ae`'s batch code moments, through the same hook as the GAN's phases; the VAE's
reparameterisation noise comes from the per-round streams, drawn for the global batch.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ganray.models.autoencoders import AESampler, CodeGaussian, Decoder, Encoder
from ganray.models.ema import ema_beta
from ganray.models.vae import VAE
from ganray.workers.learners.base import LearnerStepper
from ganray.workers.phases import Phase, RoundTable, Term
from ganray.workers.stats import RoundStats

RECONSTRUCTION, KL = "reconstruction", "KL"
LOSS_RECONSTRUCTION = "loss/reconstruction"
LOSS_KL = "loss/KL"
LOSS_VAE = "loss/VAE"          # the negative ELBO: reconstruction + KL
CODE_STD = "AE/code_std"       # mean per-dimension std of the fitted code Gaussian
EPS_SLOT = 10_000              # the VAE's reparameterisation noise within a round


def standardisation(source: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(shift per value, one scale) of the training set, computed identically in every replica
    (each holds the whole set); (0, 1) for a source that is not one tensor in memory."""
    data = getattr(source, "data", None)
    features = 1
    for s in source.sample_shape:
        features *= int(s)
    if not isinstance(data, torch.Tensor) or data.shape[0] < 2:
        return torch.zeros(features), torch.ones(())
    flat = data.reshape(data.shape[0], -1).to(torch.float64)
    scale = flat.var(dim=0, unbiased=False).mean().sqrt().clamp(min=1e-6)
    return flat.mean(dim=0).float(), scale.float()


class AutoencoderStepper(LearnerStepper):
    """`model.learner: ae`: encoder + decoder trained by reconstruction; samples from the decoder
    on a Gaussian fitted to the training codes, plus `model.ae_noise`."""

    name = "ae"

    def build(self) -> None:
        cfg, shape = self.model_cfg, self.sample_shape
        k, hidden, depth = int(cfg["z_dim"]), int(cfg["hidden"]), int(cfg["depth"])
        self.encoder = Encoder(shape, hidden, depth, k).to(self.device)
        self.decoder = Decoder(k, hidden, depth, shape).to(self.device)
        shift, scale = standardisation(self.source)
        for net in (self.encoder, self.decoder):
            net.set_standardisation(shift.to(self.device), scale.to(self.device))
        self.codes = CodeGaussian(k).to(self.device)
        self.ae_noise = float(cfg.get("ae_noise", 0.0))
        # The code statistics average over the same horizon G_ema would (schedule.ema_half_life_kimg).
        self.code_beta = ema_beta(self.settings.global_batch, self.settings.ema_half_life_kimg)
        self.add_optimizer("AE", [*self.encoder.parameters(), *self.decoder.parameters()], "g_lr")

    def networks(self) -> dict[str, nn.Module]:
        return {"encoder": self.encoder, "decoder": self.decoder, "codes": self.codes}

    def table(self) -> RoundTable:
        return RoundTable((Phase("AE", "autoencoder", "opt_AE", (Term(RECONSTRUCTION),)),
                           Phase("codes", "codes", None)))

    def round(self, stats: RoundStats) -> None:
        x = self.real_batch()
        code = self.encoder(x)
        loss = (self.decoder.raw(code) - self.encoder.standardise(x)).pow(2).mean()
        loss.backward()
        self.step("AE", stats)
        stats.report(LOSS_RECONSTRUCTION, loss.detach())
        # The codes phase: this batch's moments, averaged over the replicas (equal local batches,
        # so the mean of their means is the global batch's), folded into the running ones.
        mean, second = CodeGaussian.batch_moments(code.detach())
        self.average([mean, second])
        self.codes.update(mean, second, self.code_beta)
        stats.report(CODE_STD, self.codes.covariance().diagonal().clamp(min=0.0).sqrt().mean(), "last")

    def averaged_numel(self) -> int:
        k = self.codes.mean.numel()
        return k + k * k  # the batch code moments

    def sampling_module(self) -> nn.Module:
        return AESampler(copy.deepcopy(self.decoder), self.ae_noise).fit(self.codes).eval().requires_grad_(False)


class VAEStepper(LearnerStepper):
    """`model.learner: vae`: the ELBO with the reparameterised Gaussian code; samples are the
    decoder's means on z ~ N(0, I)."""

    name = "vae"

    def build(self) -> None:
        cfg = self.model_cfg
        self.code_dim = int(cfg["z_dim"])
        self.vae = VAE(self.sample_shape, self.code_dim, int(cfg["hidden"]), int(cfg["depth"])).to(self.device)
        shift, scale = standardisation(self.source)
        self.vae.set_standardisation(shift.to(self.device), scale.to(self.device))
        self.add_optimizer("VAE", self.vae.parameters(), "g_lr")

    def networks(self) -> dict[str, nn.Module]:
        return {"vae": self.vae}

    def table(self) -> RoundTable:
        return RoundTable((Phase("VAE", "vae", "opt_VAE", (Term(RECONSTRUCTION), Term(KL))),))

    def round(self, stats: RoundStats) -> None:
        x = self.real_batch()
        eps = self.normal(EPS_SLOT, (self.code_dim,))
        nll, kl = self.vae.elbo_terms(x, eps)
        loss = (nll + kl).mean()
        loss.backward()
        self.step("VAE", stats)
        stats.report(LOSS_VAE, loss.detach())
        stats.report(LOSS_RECONSTRUCTION, nll.detach().mean())
        stats.report(LOSS_KL, kl.detach().mean())

    def sampling_module(self) -> nn.Module:
        return copy.deepcopy(self.vae.decoder).eval().requires_grad_(False)
