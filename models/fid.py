"""Image sample-quality metrics: FID and KID through torchmetrics, on any feature network.

Nothing here downloads anything. Two feature networks are provided:

- `DigitsFeatureNet` (`digits_classifier.py`), a small CNN trained on scikit-learn's 8x8 digits;
- `inception_feature_net(path)`, Inception-v3 pool features from a *local* weights file.

Convention: every feature network here takes images in [-1, 1] (the generators' tanh range)
and returns (N, F) features. `FeatureExtractor` adapts such a network to what torchmetrics
calls with `normalize=True` ([0, 1] floats). `image_scores` extracts features itself (so the
real side can come from `RealStatsCache`) and hands them to torchmetrics' own FID/KID code
through an identity module, so the numbers are exactly torchmetrics', in float64.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from ganray.models.digits_classifier import atomic_write, check_cache_key
from ganray.models.errors import ConfigError

INCEPTION_SIZE = 299

ImageSource = Tensor | Callable[[], Tensor]


def _first_param(module: nn.Module) -> Tensor | None:
    return next(iter(module.parameters()), None)


class FeatureExtractor(nn.Module):
    """Adapts a feature net (images in [-1, 1] -> (N, F)) to torchmetrics' `feature=` argument.

    Use with `normalize=True`: torchmetrics then hands over floats in [0, 1] (uint8 in
    [0, 255] is accepted too) and this maps them back to [-1, 1]. The net's `features(x)`
    method is used when it has one (DigitsFeatureNet), else its forward. `num_features` is the
    net's own int `num_features` if it declares one, else found by probing once with the data's
    own shape, so torchmetrics never probes with its default (3, 299, 299) dummy image.
    Output is float64; the module never leaves eval mode.
    """

    def __init__(self, net: nn.Module, sample_shape: Sequence[int]) -> None:
        super().__init__()
        self.net = net
        self.sample_shape = tuple(int(s) for s in sample_shape)
        self.eval()
        declared = getattr(net, "num_features", None)
        if isinstance(declared, int):  # e.g. InceptionFeatures: spares a 299x299 probe
            self.num_features = declared
            return
        probe = self.embed(torch.zeros(2, *self.sample_shape))
        if probe.dim() != 2:
            raise ValueError(f"feature net must return (N, F) features, got shape {tuple(probe.shape)}")
        self.num_features = int(probe.shape[1])

    def train(self, mode: bool = True) -> "FeatureExtractor":
        # Metric.train() would otherwise switch the feature net's BatchNorm/dropout to training.
        return super().train(False)

    def embed(self, images: Tensor) -> Tensor:
        """Features (N, F) of images in [-1, 1], in the net's own dtype, on the images' device."""
        param = _first_param(self.net)
        device = param.device if param is not None else images.device
        dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
        features_fn = getattr(self.net, "features", None)
        # A submodule called `features` (torchvision's VGG, AlexNet) is a conv trunk, not this API.
        use_method = callable(features_fn) and not isinstance(features_fn, nn.Module)
        with torch.no_grad():
            x = images.to(device=device, dtype=dtype)
            out = features_fn(x) if use_method else self.net(x)
        return out.reshape(out.shape[0], -1).to(images.device)

    def forward(self, imgs: Tensor) -> Tensor:
        unit = imgs.float() / 255.0 if imgs.dtype == torch.uint8 else imgs
        return self.embed(unit * 2.0 - 1.0).double()


def _check_images(images: Tensor, sample_shape: tuple[int, ...], what: str) -> None:
    if images.dim() != len(sample_shape) + 1 or tuple(images.shape[1:]) != sample_shape:
        expected = ", ".join(map(str, sample_shape))
        raise ValueError(f"{what} images must have shape (N, {expected}), got {tuple(images.shape)}")


def extract_features(extractor: FeatureExtractor, images: Tensor, batch_size: int = 256) -> Tensor:
    """Features (N, F) of images in [-1, 1], batch by batch, gathered on the CPU."""
    _check_images(images, extractor.sample_shape, "feature")
    chunks = [extractor.embed(images[i : i + batch_size]).cpu() for i in range(0, images.shape[0], batch_size)]
    return torch.cat(chunks)


def module_fingerprint(module: nn.Module) -> str:
    """sha256 over a module's class, its state dict and (for an extractor) the input shape:
    two feature nets with equal fingerprints compute equal features."""
    digest = hashlib.sha256(type(module).__qualname__.encode())
    digest.update(repr(getattr(module, "sample_shape", None)).encode())
    for name, tensor in module.state_dict().items():
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class RealStatsCache:
    """Real-image features cached on disk by (data hash, feature-net fingerprint).

    The real side of FID/KID is the same for every evaluation of a job (and of every job on
    the same data), so it is computed once: one `torch.save`d dict of tensors per key, loaded
    with `weights_only=True`. `computed` counts how often features had to be extracted.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.computed = 0

    def path(self, data_hash: str, extractor: FeatureExtractor) -> Path:
        return self.root / f"real_features_{check_cache_key(data_hash)}_{module_fingerprint(extractor)[:16]}.pt"

    def features(
        self, data_hash: str, extractor: FeatureExtractor, real: ImageSource, batch_size: int = 256
    ) -> Tensor:
        """The real features for `data_hash`; `real` (images or a function loading them) is
        only touched on a cache miss."""
        path = self.path(data_hash, extractor)
        try:
            stored = torch.load(path, map_location="cpu", weights_only=True)
            feats = stored["features"]
            if isinstance(feats, Tensor) and feats.dim() == 2 and feats.shape[1] == extractor.num_features:
                return feats
        except Exception:  # missing or unreadable: recompute and overwrite
            pass
        images = real if isinstance(real, Tensor) else real()
        feats = extract_features(extractor, images, batch_size)
        self.computed += 1
        self.root.mkdir(parents=True, exist_ok=True)
        # Stored in the net's own dtype (float32 for the built-ins): exact, half of float64's size.
        atomic_write(path, lambda p: torch.save({"features": feats}, p))
        return feats


class _Precomputed(nn.Module):
    """Identity 'feature extractor': lets torchmetrics' FID/KID math run on features that
    were extracted (or loaded from the cache) beforehand."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: Tensor) -> Tensor:
        return features


def feature_scores(
    real_features: Tensor, fake_features: Tensor, kid_subset_size: int = 1000, kid_subsets: int = 100, seed: int = 0
) -> dict[str, float]:
    """FID, KID and KID's spread over subsets from (N, F) features, computed by torchmetrics
    in float64. The KID subset size is capped at the smaller sample count; KID's random
    subsets are drawn from `seed` without touching the caller's RNG."""
    n_real, n_fake = int(real_features.shape[0]), int(fake_features.shape[0])
    if n_real < 2 or n_fake < 2:
        raise ValueError(f"FID/KID need at least 2 real and 2 generated samples, got {n_real} and {n_fake}")
    if real_features.shape[1] != fake_features.shape[1]:
        raise ValueError(f"feature widths differ: {real_features.shape[1]} vs {fake_features.shape[1]}")
    real64, fake64 = real_features.double(), fake_features.double()
    identity = _Precomputed(int(real64.shape[1]))

    fid = FrechetInceptionDistance(feature=identity, normalize=True)
    fid.update(real64, real=True)
    fid.update(fake64, real=False)
    fid_value = float(fid.compute())

    with warnings.catch_warnings():
        # KID warns that it keeps every feature in memory: that is what we hand it anyway.
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        kid = KernelInceptionDistance(
            feature=identity, subsets=kid_subsets, subset_size=min(kid_subset_size, n_real, n_fake), normalize=True
        )
    kid.update(real64, real=True)
    kid.update(fake64, real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
    return {"fid": fid_value, "kid": float(kid_mean), "kid_std": float(kid_std)}


def image_scores(
    real: ImageSource,
    fake: Tensor,
    feature_net: nn.Module,
    sample_shape: Sequence[int],
    kid_subset_size: int = 1000,
    *,
    kid_subsets: int = 100,
    seed: int = 0,
    batch_size: int = 256,
    cache: RealStatsCache | None = None,
    data_hash: str | None = None,
) -> dict[str, float]:
    """`{"fid", "kid", "kid_std"}` of generated images against real ones, both (N, *sample_shape)
    in [-1, 1], on the features of `feature_net` (or a ready `FeatureExtractor`).

    With `cache` and `data_hash`, the real features come from the cache and `real` (which may
    then be a function returning the images) is only used on a miss.
    """
    shape = tuple(int(s) for s in sample_shape)
    extractor = feature_net if isinstance(feature_net, FeatureExtractor) else FeatureExtractor(feature_net, shape)
    if extractor.sample_shape != shape:
        raise ValueError(f"feature extractor expects {extractor.sample_shape}, images are {shape}")
    if cache is not None:
        if data_hash is None:
            raise ValueError("image_scores: a RealStatsCache needs the real data's data_hash")
        real_feats = cache.features(data_hash, extractor, real, batch_size)
    else:
        real_feats = extract_features(extractor, real if isinstance(real, Tensor) else real(), batch_size)
    _check_images(fake, shape, "generated")
    fake_feats = extract_features(extractor, fake, batch_size)
    return feature_scores(real_feats, fake_feats, kid_subset_size, kid_subsets, seed)


class InceptionFeatures(nn.Module):
    """Inception-v3 2048-d pool features of images in [-1, 1], (N, 1 or 3, H, W), any size."""

    num_features = 2048

    def __init__(self, backbone: nn.Module, uint8_input: bool) -> None:
        super().__init__()
        self.backbone = backbone
        self.uint8_input = uint8_input
        self.eval()

    def train(self, mode: bool = True) -> "InceptionFeatures":
        return super().train(False)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[1] == 1:  # grayscale sets: the usual channel repeat
            x = x.expand(-1, 3, -1, -1)
        if self.uint8_input:
            # torch-fidelity's network resizes itself and takes uint8, converted the way
            # torchmetrics does for normalize=True: (x01 * 255).byte(), i.e. truncation.
            return self.backbone(((x + 1.0) / 2.0 * 255.0).clamp(0.0, 255.0).to(torch.uint8))
        x = F.interpolate(x.float(), size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False)
        # The TF-ported Inception weights expect inputs in [-1, 1] (torchvision's
        # transform_input=True only converts ImageNet-normalised inputs to that range).
        return self.backbone(x)


def inception_feature_net(weights_path: str) -> InceptionFeatures:
    """Inception-v3 pool features from a LOCAL weights file; nothing is downloaded.

    With torch-fidelity installed, the file is torch-fidelity's FID Inception weights and the
    network is torchmetrics' own (`NoTrainInceptionV3`), so scores equal torchmetrics'
    defaults. Without it, the file is a torchvision `inception_v3` state dict (any class count,
    with or without the aux head) and the features are the 2048-d average-pool output.
    """
    path = Path(weights_path) if weights_path else None
    if path is None or not path.is_file():
        raise ConfigError(
            f"Inception weights not found at {weights_path!r}: set eval.inception_weights to a local "
            "weights file (ganray never downloads weights)"
        )
    # Building the network runs its (overwritten) random initialisation: keep that off the
    # trainer's RNG stream, which an evaluation must not shift.
    with torch.random.fork_rng(devices=[]):
        return _inception_from_file(path)


def _inception_from_file(path: Path) -> InceptionFeatures:
    try:
        import torch_fidelity  # noqa: F401  (only its presence matters)
    except ImportError:
        return InceptionFeatures(_torchvision_inception(path), uint8_input=False)
    from torchmetrics.image.fid import NoTrainInceptionV3

    try:
        backbone = NoTrainInceptionV3(
            name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=str(path)
        )
    except Exception as exc:
        raise ConfigError(
            f"cannot load Inception weights {path}: {str(exc)[:200]}; set eval.inception_weights "
            "to torch-fidelity's FID Inception weights file"
        ) from exc
    return InceptionFeatures(backbone, uint8_input=True)


def _torchvision_inception(path: Path) -> nn.Module:
    from torchvision.models import inception_v3

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        num_classes = int(state["fc.weight"].shape[0])
        aux_logits = any(k.startswith("AuxLogits.") for k in state)
        net = inception_v3(
            weights=None, aux_logits=aux_logits, init_weights=False, num_classes=num_classes, transform_input=False
        )
        net.load_state_dict(state)
    except Exception as exc:
        raise ConfigError(
            f"cannot load Inception weights {path} as a torchvision inception_v3 state dict "
            f"({type(exc).__name__}: {str(exc)[:200]}); set eval.inception_weights to such a file"
        ) from exc
    net.fc = nn.Identity()  # the 2048-d pool features (dropout is inert in eval mode)
    return net.eval()
