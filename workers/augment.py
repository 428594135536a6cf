"""Augmentation of everything D sees, and ADA's adaptive probability p (plain torch, no Ray).

`augment.kind: diffaugment` (Zhao et al. 2020) passes every input of D, real and fake, in every D
and G phase, through differentiable augmentations; `ada` (Karras et al. 2020, StyleGAN2-ADA)
applies each of them to a sample with probability p and steers p with the overfitting heuristic
r_t = E[sign(D(real))]: every `augment.interval` D steps p moves up by a fixed step when r_t is
above `augment.target` and down otherwise, the step chosen so that p could go from 0 to 1 in
`augment.speed_kimg` thousand real images. G's loss is taken through the same augmentations
(they are differentiable), so D judges augmented reals against augmented fakes and G is pushed
towards the data, not towards augmented data, as long as the augmentations do not leak (ADA's
argument: with p below 1 enough inputs stay untouched for D to tell the two apart).

The augmentations (ADA's pixel blitting and colour groups, DiffAugment's cutout), in order:
horizontal flip (only with `augment.flip`: digits are not mirror-symmetric), integer translation
by up to 1/8 of the image with reflected borders, brightness, saturation, contrast, and cutout
of a square half the image's side. Each sample draws its own parameters from `DRAWS` uniforms
that the caller takes from the per-round noise streams (`NoiseStreams.uniform_rows`), so every
topology augments a row exactly the same way and local = replicated(1) = split(1G, 1D) hold.

In `replicated` every replica holds the same p: each D step's mean sign of D on this replica's
reals rides along with D's gradient all-reduce (`pending_signs`), so the r_t every replica
accumulates is the global batch's. In `split` each discriminator steers its own p.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from ganray.models.errors import ConfigError

KINDS = ("none", "ada", "diffaugment")
# Per-sample uniforms of one augmentation call: six "is this augmentation on" draws (compared
# with p), then the parameters: translation x and y, brightness, saturation, contrast, cutout
# centre x and y, flip's coin. Fixed whatever is enabled, so a setting never shifts the others.
DRAWS = 14
_ON_FLIP, _ON_SHIFT, _ON_BRIGHT, _ON_SAT, _ON_CONTRAST, _ON_CUTOUT = range(6)
_SHIFT_X, _SHIFT_Y, _BRIGHT, _SAT, _CONTRAST, _CUT_X, _CUT_Y, _FLIP_COIN = range(6, 14)
TRANSLATE_FRACTION = 0.125   # StyleGAN2-ADA's and DiffAugment's translation range
CUTOUT_FRACTION = 0.5        # DiffAugment's cutout side

P_METRIC = "augment/p"


def p_metric(d_index: Optional[int] = None) -> str:
    """The statistic of p: one p in `local` and `replicated`, one per discriminator in `split`."""
    return P_METRIC if d_index is None else f"{P_METRIC}/d{d_index}"


@dataclass(frozen=True)
class AugmentSettings:
    """The `augment` section of the job config."""

    kind: str = "none"
    target: float = 0.6
    interval: int = 4
    speed_kimg: float = 500.0
    flip: bool = False
    p_init: Optional[float] = None

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "AugmentSettings":
        # A config stored before the section existed has none: augmentation off.
        section = dict(config.get("augment") or {})
        kind = str(section.get("kind", "none"))
        if kind not in KINDS:
            raise ConfigError(f"augment.kind must be one of {', '.join(KINDS)} (got {kind!r})")
        return cls(kind=kind, target=float(section.get("target", 0.6)),
                   interval=int(section.get("interval", 4)), speed_kimg=float(section.get("speed_kimg", 500.0)),
                   flip=bool(section.get("flip", False)),
                   p_init=None if section.get("p_init") is None else float(section["p_init"]))

    @property
    def enabled(self) -> bool:
        return self.kind != "none"

    @property
    def adaptive(self) -> bool:
        return self.kind == "ada"

    def initial_p(self) -> float:
        """p at the start: `p_init`, else 0 for ada (it rises when D overfits) and 1 for
        diffaugment (every augmentation on every input, p never moves)."""
        if self.p_init is not None:
            return self.p_init
        return 0.0 if self.adaptive else 1.0

    def p_step(self, global_batch: int) -> float:
        """How far p moves per adjustment: `interval` D steps of `global_batch` real images each,
        at a speed that would take p from 0 to 1 in `speed_kimg` thousand images (ADA's formula)."""
        return global_batch * self.interval / (self.speed_kimg * 1000.0)


def refuse_unless_images(settings: AugmentSettings, sample_shape: Sequence[int], data_name: str) -> None:
    """The augmentations act on (C, H, W) images; anything else is a one-line ConfigError."""
    if settings.enabled and len(tuple(sample_shape)) != 3:
        raise ConfigError(f"augment.kind '{settings.kind}' augments images, and data '{data_name}' has samples "
                          f"of shape {tuple(sample_shape)}; set augment.kind: none")


def _reflect(index: torch.Tensor, size: int) -> torch.Tensor:
    """Indices outside [0, size) mirrored back inside (reflect padding, no repeated edge)."""
    index = index.abs()
    return (size - 1) - ((size - 1) - index).abs()


def _translate(x: torch.Tensor, shift_x: torch.Tensor, shift_y: torch.Tensor) -> torch.Tensor:
    """Each image moved by its own integer shift, borders reflected; a gather, so gradients
    flow back to the pixels that were moved."""
    n, c, h, w = x.shape
    cols = _reflect(torch.arange(w, device=x.device)[None, :] - shift_x[:, None], w)
    rows = _reflect(torch.arange(h, device=x.device)[None, :] - shift_y[:, None], h)
    x = x.gather(3, cols[:, None, None, :].expand(n, c, h, w))
    return x.gather(2, rows[:, None, :, None].expand(n, c, h, w))


def _cutout_mask(u: torch.Tensor, on: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(N, 1, H, W): 0 inside each enabled sample's square, 1 elsewhere."""
    side_h, side_w = max(1, round(h * CUTOUT_FRACTION)), max(1, round(w * CUTOUT_FRACTION))
    # The square's centre anywhere on the image, so it may hang over an edge (DiffAugment's).
    top = (u[:, _CUT_Y] * (h + 1)).floor().long() - side_h // 2
    left = (u[:, _CUT_X] * (w + 1)).floor().long() - side_w // 2
    rows = torch.arange(h, device=u.device)[None, :]
    cols = torch.arange(w, device=u.device)[None, :]
    in_rows = (rows >= top[:, None]) & (rows < top[:, None] + side_h)
    in_cols = (cols >= left[:, None]) & (cols < left[:, None] + side_w)
    inside = in_rows[:, :, None] & in_cols[:, None, :] & on[:, None, None]
    return (~inside).to(u.dtype)[:, None]


def augment(x: torch.Tensor, u: torch.Tensor, p: torch.Tensor | float, flip: bool = False) -> torch.Tensor:
    """`x` (N, C, H, W) with each augmentation applied to each sample with probability `p`,
    its parameters read from `u` (N, DRAWS) uniforms in [0, 1). Differentiable in `x`; the
    shape and dtype are kept. A sample with every augmentation off is `x`'s
    own row, bit for bit."""
    if x.dim() != 4:
        raise ValueError(f"augment takes (N, C, H, W) images, not a tensor of shape {tuple(x.shape)}")
    if u.shape != (x.shape[0], DRAWS):
        raise ValueError(f"augment needs ({x.shape[0]}, {DRAWS}) uniforms, got {tuple(u.shape)}")
    n, c, h, w = x.shape
    u = u.to(device=x.device, dtype=torch.float32)
    on = u[:, :6] < p
    col = (slice(None), None, None, None)  # a per-sample value broadcast over (C, H, W)

    if flip:
        flipped = on[:, _ON_FLIP] & (u[:, _FLIP_COIN] < 0.5)
        x = torch.where(flipped[col], x.flip(3), x)
    # Translation: a shift of 0 is the identity gather, so disabled samples are untouched.
    reach_x, reach_y = max(1, round(w * TRANSLATE_FRACTION)), max(1, round(h * TRANSLATE_FRACTION))
    shift_x = ((u[:, _SHIFT_X] * (2 * reach_x + 1)).floor().long() - reach_x) * on[:, _ON_SHIFT]
    shift_y = ((u[:, _SHIFT_Y] * (2 * reach_y + 1)).floor().long() - reach_y) * on[:, _ON_SHIFT]
    x = _translate(x, shift_x, shift_y)
    # Colour, on the [-1, 1] scale: DiffAugment's ranges.
    bright = (u[:, _BRIGHT] - 0.5).to(x.dtype)
    x = torch.where(on[:, _ON_BRIGHT][col], x + bright[col], x)
    if c > 1:  # one channel has no saturation to change
        mean = x.mean(dim=1, keepdim=True)
        sat = (u[:, _SAT] * 2.0).to(x.dtype)
        x = torch.where(on[:, _ON_SAT][col], (x - mean) * sat[col] + mean, x)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    contrast = (u[:, _CONTRAST] + 0.5).to(x.dtype)
    x = torch.where(on[:, _ON_CONTRAST][col], (x - mean) * contrast[col] + mean, x)
    return x * _cutout_mask(u, on[:, _ON_CUTOUT], h, w).to(x.dtype)


class Augmenter:
    """One discriminator's augmentation and its p (state: saved in checkpoints, restored on resume).

    p lives on the device as a tensor and moves there, so steering it costs no host sync."""

    def __init__(self, settings: AugmentSettings, device: torch.device) -> None:
        self.settings = settings
        self.p = torch.full((), settings.initial_p(), dtype=torch.float32, device=device)
        # r_t's running sum of per-D-step mean signs since the last adjustment, and its count.
        self._sign_sum = torch.zeros((), dtype=torch.float32, device=device)
        self._steps = 0
        self._pending: Optional[torch.Tensor] = None  # this D step's mean sign, not yet accumulated

    def __call__(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return augment(x, u, self.p, self.settings.flip)

    def observe_reals(self, logits: torch.Tensor) -> None:
        """Keep this D step's mean sign of D on the (augmented) reals for r_t (ada only)."""
        if not self.settings.adaptive:
            return
        # A non-finite logit counts as 0, so one bad step cannot make p NaN for good.
        sign = (logits.detach() > 0).float() - (logits.detach() < 0).float()
        self._pending = sign.mean().reshape(1)

    def pending_signs(self) -> list[torch.Tensor]:
        """What rides along with D's gradient all-reduce: this step's mean sign (ada), which the
        reduce replaces by its mean over the replicas (equal shards: the global batch's mean)."""
        return [] if self._pending is None else [self._pending]

    def end_d_step(self, adjust: bool, p_step: float) -> None:
        """After a D step (its signs reduced): accumulate r_t and, when the round table says an
        adjustment is due (`adjust`), move p by `p_step` towards less or more augmentation."""
        if self._pending is None:
            return
        self._sign_sum = self._sign_sum + self._pending[0]
        self._steps += 1
        self._pending = None
        if not adjust:
            return
        r_t = self._sign_sum / self._steps
        self.p = (self.p + torch.sign(r_t - self.settings.target) * p_step).clamp(0.0, 1.0)
        self._sign_sum = torch.zeros_like(self._sign_sum)
        self._steps = 0

    def state(self) -> dict[str, Any]:
        return {"p": self.p.detach().cpu().clone(), "sign_sum": self._sign_sum.detach().cpu().clone(),
                "steps": int(self._steps)}

    def load_state(self, state: dict[str, Any]) -> None:
        device = self.p.device
        self.p = state["p"].to(device=device, dtype=torch.float32).reshape(())
        self._sign_sum = state["sign_sum"].to(device=device, dtype=torch.float32).reshape(())
        self._steps = int(state["steps"])
        self._pending = None
