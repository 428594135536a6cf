"""The built-in networks: an MLP pair for 2D (or any flat) data and a DCGAN pair for images.

G maps z (N, z_dim) to samples (N, *sample_shape); D maps samples to logits (N,).
With `num_classes` > 0 both are class-conditional (a conditional GAN, Mirza & Osindero 2014):
G(z, y) reads a learned class embedding concatenated with z (the usual conditional input of an
MLP or DCGAN generator), and D(x, y) is a projection discriminator (Miyato & Koyama 2018): its
logit gains the inner product of a class embedding with D's last features.
Both discriminators are free of BatchNorm on purpose: R1 and the WGAN gradient penalty
differentiate `D(x).sum()` with respect to the batch, which equals the per-sample gradients only
when no sample's logit depends on another sample's input. BatchNorm in D would mix them (and
would also make replicated workers disagree with one local process).
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm

DCGAN_RESOLUTIONS = (8, 16, 32, 64)


def _spectralize(root: nn.Module) -> None:
    """Put every Linear/conv weight under `root` behind spectral normalisation, in place.

    Called after initialisation: the parametrization keeps the initialised weight as `original`
    and starts its power iteration from it. (It also picks dim=1 for ConvTranspose weights.)
    """
    for module in list(root.modules()):
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
            _spectral_norm(module)


class ClassInput(nn.Module):
    """The conditional generator's input: z concatenated with a learned embedding of class y.

    Without classes (`y` None) row i takes class i mod num_classes, so code that samples a
    generator with z alone (evaluation, retrain, Tune, sample grids) covers every class equally."""

    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__()
        self.num_classes = int(num_classes)
        self.embed = nn.Embedding(self.num_classes, dim)

    def forward(self, z: torch.Tensor, y: Optional[torch.Tensor]) -> torch.Tensor:
        if y is None:
            y = torch.arange(z.shape[0], device=z.device) % self.num_classes
        return torch.cat([z, self.embed(y.to(torch.long)).to(z.dtype)], dim=1)


class Projection(nn.Module):
    """The class term of a projection discriminator: <embed(y), features>, one value per row.

    A packed D (PacGAN) judges `pack` rows from one feature vector: their embeddings are summed,
    so the term still reads every member's class."""

    def __init__(self, num_classes: int, dim: int, pack: int = 1) -> None:
        super().__init__()
        self.num_classes, self.pack = int(num_classes), int(pack)
        self.embed = nn.Embedding(self.num_classes, dim)
        nn.init.xavier_uniform_(self.embed.weight)  # SNGAN's projection initialisation

    def forward(self, features: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        e = self.embed(y.to(torch.long)).to(features.dtype)
        if self.pack > 1:
            e = e.reshape(-1, self.pack, e.shape[-1]).sum(dim=1)
        return (e * features).sum(dim=1)


def _need_classes(module: nn.Module, y: Optional[torch.Tensor]) -> None:
    if y is None:
        raise ValueError(f"{type(module).__name__} is class-conditional: call it with the classes y")


def _judge_packs(logits_of: Callable[[torch.Tensor, Optional[torch.Tensor]], torch.Tensor], pack: int,
                 x: torch.Tensor, y: Optional[torch.Tensor], packed_shape: tuple[int, ...]) -> torch.Tensor:
    """PacGAN: consecutive groups of `pack` samples are judged as one input of `packed_shape`;
    each member gets its pack's logit (N,)."""
    if pack == 1:
        return logits_of(x, y)
    n = x.shape[0]
    if n % pack:
        raise ValueError(f"a packed discriminator (pack={pack}) needs a batch that is a multiple of {pack}, "
                         f"got {n} samples")
    return logits_of(x.reshape(n // pack, *packed_shape), y).repeat_interleave(pack)


def _as_shape(sample_shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(int(s) for s in sample_shape)
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"sample_shape must be a non-empty tuple of positive ints, got {sample_shape!r}")
    return shape


class MLPGenerator(nn.Module):
    """z -> `depth` x (Linear, [BatchNorm1d], ReLU) -> Linear -> reshape to `sample_shape`.

    No output squashing: the 2D mixtures live on [-4, 4]^2, not [-1, 1]. BatchNorm is off by
    default because replicated-vs-local equivalence must not depend on per-worker batch
    statistics; `batchnorm=True` is PacGAN's generator (it keeps every ReLU's kink inside the
    batch's spread, which helps G fold the Gaussian latent onto many separate modes).

    `skip=True` adds a linear path from z to the output: G starts as (nearly) an affine map of
    the latent box onto the data's extent, so each mode of a grid begins with its own equal
    share of the latent and the MLP only has to bend the map between modes. On grid25 it keeps
    every mode on more seeds than the plain MLP (docs/performance.md).
    """

    def __init__(self, z_dim: int, hidden: int, depth: int, sample_shape: Sequence[int] = (2,),
                 batchnorm: bool = False, skip: bool = False, num_classes: int = 0) -> None:
        super().__init__()
        if z_dim < 1 or hidden < 1 or depth < 1:
            raise ValueError(f"z_dim, hidden and depth must be >= 1 (got {z_dim}, {hidden}, {depth})")
        self.z_dim = int(z_dim)
        self.sample_shape = _as_shape(sample_shape)
        self.num_classes = int(num_classes)
        layers: list[nn.Module] = []
        # A conditional G reads [z, embed(y)]: the embedding as wide as z.
        width_in = self.z_dim * (2 if self.num_classes else 1)
        input_width = width_in
        for _ in range(depth):
            # A Linear followed by BatchNorm needs no bias: BN's shift replaces it.
            layers.append(nn.Linear(width_in, hidden, bias=not batchnorm))
            if batchnorm:
                layers.append(nn.BatchNorm1d(hidden))
            layers.append(nn.ReLU(inplace=True))
            width_in = hidden
        layers.append(nn.Linear(width_in, math.prod(self.sample_shape)))
        self.net = nn.Sequential(*layers)
        self.skip = nn.Linear(input_width, math.prod(self.sample_shape)) if skip else None
        # Built last, so an unconditional G draws its initial weights exactly as before.
        self.classes = ClassInput(self.num_classes, self.z_dim) if self.num_classes else None

    def forward(self, z: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        h = self.classes(z, y) if self.classes is not None else z
        out = self.net(h)
        if self.skip is not None:
            out = out + self.skip(h)
        return out.view(z.shape[0], *self.sample_shape)


class MLPDiscriminator(nn.Module):
    """flatten -> `depth` x (Linear, LeakyReLU(0.2)) -> Linear -> logits (N,).

    `pack` > 1 is PacGAN (Lin et al. 2018): D judges `pack` samples at once, concatenated, so a
    generator that repeats one mode is visible to it. Consecutive samples of the batch form a
    pack, the batch size must be a multiple of `pack`, and each pack's logit is repeated for its
    members so D still returns (N,) and a batch-mean loss equals the mean over packs. A packed
    D is not per-sample (see the module docstring): R1 then acts on the packed input, and its
    mean squared gradient per sample is `pack` times that of the packed logit.
    """

    def __init__(self, hidden: int, depth: int, sample_shape: Sequence[int] = (2,),
                 spectral_norm: bool = False, pack: int = 1, num_classes: int = 0) -> None:
        super().__init__()
        if hidden < 1 or depth < 1:
            raise ValueError(f"hidden and depth must be >= 1 (got {hidden}, {depth})")
        if pack < 1:
            raise ValueError(f"pack must be >= 1, got {pack}")
        self.sample_shape = _as_shape(sample_shape)
        self.pack = int(pack)
        layers: list[nn.Module] = [nn.Flatten(1)]
        width_in = math.prod(self.sample_shape) * self.pack
        for _ in range(depth):
            layers += [nn.Linear(width_in, hidden), nn.LeakyReLU(0.2)]
            width_in = hidden
        layers.append(nn.Linear(width_in, 1))
        self.net = nn.Sequential(*layers)
        if spectral_norm:
            _spectralize(self.net)
        self.num_classes = int(num_classes)
        self.projection = Projection(self.num_classes, width_in, self.pack) if self.num_classes else None
        if self.projection is not None and spectral_norm:
            _spectral_norm(self.projection.embed)  # SNGAN normalises the projection's embedding too

    def _logits(self, x: torch.Tensor, y: Optional[torch.Tensor]) -> torch.Tensor:
        if self.projection is None:
            return self.net(x).view(-1)
        _need_classes(self, y)
        features = self.net[:-1](x)
        return self.net[-1](features).view(-1) + self.projection(features, y)

    def forward(self, x: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        return _judge_packs(self._logits, self.pack, x, y, (-1,))  # a pack: its samples concatenated


def _check_image_args(resolution: int, channels: int, base_width: int) -> int:
    """Validate DCGAN arguments; return the number of stride-2 stages between 4x4 and `resolution`."""
    if resolution not in DCGAN_RESOLUTIONS:
        raise ValueError(f"DCGAN resolution must be one of {DCGAN_RESOLUTIONS}, got {resolution}")
    if channels < 1:
        raise ValueError(f"channels must be >= 1, got {channels}")
    if base_width < 1:
        raise ValueError(f"base_width must be >= 1, got {base_width}")
    return int(math.log2(resolution // 4))


def _dcgan_init(module: nn.Module) -> None:
    """Radford et al.'s init: conv weights N(0, 0.02), BatchNorm scale N(1, 0.02), zero biases."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class DCGANGenerator(nn.Module):
    """z -> 4x4 map (a 4x4 ConvTranspose) -> stride-2 ConvTranspose blocks -> tanh image.

    Widths mirror the classic DCGAN: the 4x4 map has base_width * 2^(stages-1) channels, halved
    at each doubling, so the last hidden map (at resolution/2) has base_width channels.
    """

    def __init__(self, z_dim: int, resolution: int, channels: int, base_width: int,
                 batchnorm: bool = True, spectral_norm: bool = False, num_classes: int = 0) -> None:
        super().__init__()
        if z_dim < 1:
            raise ValueError(f"z_dim must be >= 1, got {z_dim}")
        stages = _check_image_args(resolution, channels, base_width)
        self.z_dim = int(z_dim)
        self.sample_shape = (int(channels), int(resolution), int(resolution))
        self.num_classes = int(num_classes)
        input_width = self.z_dim * (2 if self.num_classes else 1)  # [z, embed(y)] when conditional

        def block(conv: nn.Module, width: int) -> list[nn.Module]:
            # A conv followed by BatchNorm needs no bias: BN's shift replaces it.
            norm: list[nn.Module] = [nn.BatchNorm2d(width)] if batchnorm else []
            return [conv, *norm, nn.ReLU(inplace=True)]

        width = base_width * 2 ** (stages - 1)
        layers = block(nn.ConvTranspose2d(input_width, width, 4, 1, 0, bias=not batchnorm), width)
        for _ in range(stages - 1):
            layers += block(nn.ConvTranspose2d(width, width // 2, 4, 2, 1, bias=not batchnorm), width // 2)
            width //= 2
        self.net = nn.Sequential(*layers)
        self.to_image = nn.ConvTranspose2d(width, channels, 4, 2, 1)
        self.apply(_dcgan_init)
        if spectral_norm:
            _spectralize(self)
        # Built last (its N(0, 1) embedding like z), so an unconditional G's init is unchanged.
        self.classes = ClassInput(self.num_classes, self.z_dim) if self.num_classes else None

    def forward(self, z: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        h = self.classes(z, y) if self.classes is not None else z
        h = self.net(h.reshape(z.shape[0], h.shape[1], 1, 1))
        return torch.tanh(self.to_image(h))


class DCGANDiscriminator(nn.Module):
    """image -> stride-2 convs with LeakyReLU(0.2) down to 4x4 -> 4x4 valid conv -> logits (N,).

    No BatchNorm (see the module docstring): R1 and the gradient penalty need per-sample gradients.
    """

    def __init__(self, resolution: int, channels: int, base_width: int, spectral_norm: bool = False,
                 num_classes: int = 0, pack: int = 1) -> None:
        super().__init__()
        stages = _check_image_args(resolution, channels, base_width)
        if pack < 1:
            raise ValueError(f"pack must be >= 1 (got {pack})")
        self.sample_shape = (int(channels), int(resolution), int(resolution))
        self.pack = int(pack)
        layers: list[nn.Module] = []
        # PacGAN for images: a pack of samples is one input of pack x channels (stacked channels).
        width_in, width = channels * self.pack, base_width
        for _ in range(stages):
            layers += [nn.Conv2d(width_in, width, 4, 2, 1), nn.LeakyReLU(0.2)]
            width_in, width = width, width * 2
        layers.append(nn.Conv2d(width_in, 1, 4, 1, 0))
        self.net = nn.Sequential(*layers)
        self.apply(_dcgan_init)
        if spectral_norm:
            _spectralize(self.net)
        # The projection reads the features the last layer reads: the whole 4x4 map, flattened
        # (the final 4x4 conv is a linear map of it, SNGAN's psi). A shallow D's pooled map loses
        # where the strokes are, which is what tells a 3 from a 5 or an 8 at 8x8.
        self.num_classes = int(num_classes)
        self.projection = Projection(self.num_classes, width_in * 16, self.pack) if self.num_classes else None
        if self.projection is not None and spectral_norm:
            _spectral_norm(self.projection.embed)

    def _logits(self, x: torch.Tensor, y: Optional[torch.Tensor]) -> torch.Tensor:
        if self.projection is None:
            return self.net(x).view(-1)
        _need_classes(self, y)
        features = self.net[:-1](x)
        return self.net[-1](features).view(-1) + self.projection(features.flatten(1), y)

    def forward(self, x: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        # A pack: its samples' channels stacked.
        return _judge_packs(self._logits, self.pack, x, y, (self.pack * x.shape[1], *x.shape[2:]))
