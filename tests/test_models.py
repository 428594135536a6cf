"""Networks, the model registry and EMA (ganray.models); the VAE learner is tested in test_learners.py."""

from __future__ import annotations

import copy
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from ganray.models.ema import EmaPair, ema_beta
from ganray.models.errors import ConfigError
from ganray.models.losses import r1_penalty
from ganray.models.nets import DCGANDiscriminator, DCGANGenerator, MLPDiscriminator, MLPGenerator
from ganray.models.registry import build_discriminator, build_generator, register_generator


def _cfg(**over: object) -> dict:
    cfg = {"generator": "mlp", "discriminator": "mlp", "z_dim": 8, "hidden": 16, "depth": 2,
           "base_width": 4, "spectral_norm": False, "batchnorm": True, "kwargs": {}}
    cfg.update(over)
    return cfg


def _has_grads(module: nn.Module) -> bool:
    return all(p.grad is not None and torch.isfinite(p.grad).all() for p in module.parameters())


# --- networks ---------------------------------------------------------------------------------

@pytest.mark.parametrize("spectral_norm", [False, True])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("resolution", [8, 16, 32, 64])
def test_dcgan_forward_backward(resolution: int, channels: int, spectral_norm: bool) -> None:
    torch.manual_seed(0)
    cfg = _cfg(generator="dcgan", discriminator="dcgan", spectral_norm=spectral_norm)
    shape = (channels, resolution, resolution)
    G, D = build_generator(cfg, shape), build_discriminator(cfg, shape)
    assert isinstance(G, DCGANGenerator) and isinstance(D, DCGANDiscriminator)
    assert G.z_dim == 8 and G.sample_shape == shape
    x = G(torch.randn(3, 8))
    assert x.shape == (3, *shape)
    assert x.abs().max() <= 1.0  # tanh output
    logits = D(x)
    assert logits.shape == (3,)
    # The full R1 path (double backward through D) must work too, with spectral norm on or off.
    (logits.mean() + r1_penalty(D, x.detach())).backward()
    assert _has_grads(G) and _has_grads(D)
    has_sn = any("parametrizations" in name for name, _ in D.named_parameters())
    assert has_sn == spectral_norm


def test_dcgan_saturates_to_tanh_range() -> None:
    G = DCGANGenerator(4, 8, 1, 4, batchnorm=False)
    with torch.no_grad():
        G.to_image.bias.fill_(100.0)  # drive every pre-activation far positive
    out = G(torch.randn(2, 4))
    assert torch.allclose(out, torch.ones_like(out))


def test_dcgan_widths_follow_base_width() -> None:
    G = DCGANGenerator(16, 32, 3, 8)
    convs = [m for m in G.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert [c.out_channels for c in convs] == [32, 16, 8, 3]  # 4x4, 8x8, 16x16 maps, then the image
    D = DCGANDiscriminator(32, 3, 8)
    assert [c.out_channels for c in D.modules() if isinstance(c, nn.Conv2d)] == [8, 16, 32, 1]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in D.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in DCGANGenerator(16, 32, 3, 8, batchnorm=False).modules())


@pytest.mark.parametrize("spectral_norm", [False, True])
def test_mlp_2d(spectral_norm: bool) -> None:
    torch.manual_seed(0)
    cfg = _cfg(spectral_norm=spectral_norm)
    G, D = build_generator(cfg, (2,)), build_discriminator(cfg, (2,))
    assert isinstance(G, MLPGenerator) and isinstance(D, MLPDiscriminator)
    assert G.z_dim == 8 and G.sample_shape == (2,)
    assert sum(isinstance(m, nn.Linear) for m in G.modules()) == 3  # depth 2 + output
    assert not any(isinstance(m, nn.BatchNorm1d) for m in G.modules())
    x = G(torch.randn(5, 8))
    assert x.shape == (5, 2)
    logits = D(x)
    assert logits.shape == (5,)
    (logits.mean() + r1_penalty(D, x.detach())).backward()
    assert _has_grads(G) and _has_grads(D)


def test_mlp_flattens_any_shape() -> None:
    G, D = build_generator(_cfg(), (1, 8, 8)), build_discriminator(_cfg(), (1, 8, 8))
    x = G(torch.randn(4, 8))
    assert x.shape == (4, 1, 8, 8)
    assert D(x).shape == (4,)


def test_mlp_generator_batchnorm_option() -> None:
    """`mlp_batchnorm` puts BatchNorm1d after each hidden Linear (bias-free); off by default."""
    assert not any(isinstance(m, nn.BatchNorm1d) for m in build_generator(_cfg(), (2,)).modules())
    torch.manual_seed(0)
    G = build_generator(_cfg(mlp_batchnorm=True), (2,))
    norms = [m for m in G.modules() if isinstance(m, nn.BatchNorm1d)]
    assert len(norms) == 2 and all(n.num_features == 16 for n in norms)
    hidden = [m for m in G.modules() if isinstance(m, nn.Linear)][:-1]
    assert all(lin.bias is None for lin in hidden)
    x = G(torch.randn(6, 8))
    x.sum().backward()
    assert x.shape == (6, 2) and _has_grads(G)
    # Training mode normalises with batch statistics, so outputs depend on the batch...
    z = torch.randn(6, 8)
    assert not torch.allclose(G(z)[:3], G(z[:3]))
    # ...while eval mode (how samples are drawn) uses the running statistics per sample.
    G.eval()
    assert torch.allclose(G(z)[:3], G(z[:3]), atol=1e-6)


def test_mlp_discriminator_pack_option() -> None:
    """`pack` m: D scores m consecutive samples jointly and repeats each pack's logit m times."""
    torch.manual_seed(0)
    D = build_discriminator(_cfg(pack=3), (2,))
    assert isinstance(D, MLPDiscriminator) and D.pack == 3
    assert D.net[1].in_features == 6  # three 2D samples concatenated
    x = torch.randn(6, 2)
    logits = D(x)
    assert logits.shape == (6,)
    assert torch.equal(logits[:3], logits[:1].expand(3)) and torch.equal(logits[3:], logits[3:4].expand(3))
    assert logits[0] != logits[3]
    # One pack's logit depends on every member of that pack and on no other sample.
    y = x.clone()
    y[1] += 1.0
    moved = D(y)
    assert moved[0] != logits[0] and torch.equal(moved[3:], logits[3:])
    assert torch.allclose(D(x[3:]), logits[3:])
    (logits.mean() + r1_penalty(D, x)).backward()
    assert _has_grads(D)
    with pytest.raises(ValueError, match="multiple of 3"):
        D(torch.randn(4, 2))
    with pytest.raises(ValueError, match="pack"):
        MLPDiscriminator(16, 2, pack=0)


def test_dcgan_discriminator_packs_samples_as_stacked_channels() -> None:
    """PacGAN for images: `pack` m consecutive samples are one input of m x channels; each member
    gets its pack's logit, which depends on every member and on no other sample."""
    torch.manual_seed(0)
    D = build_discriminator(_cfg(discriminator="dcgan", base_width=8, pack=2), (3, 8, 8))
    assert isinstance(D, DCGANDiscriminator) and D.pack == 2 and D.net[0].in_channels == 6
    x = torch.randn(4, 3, 8, 8)
    logits = D(x)
    assert logits.shape == (4,) and torch.equal(logits[:2], logits[:1].expand(2)) and logits[0] != logits[2]
    y = x.clone()
    y[1] += 1.0
    moved = D(y)
    assert moved[0] != logits[0] and torch.equal(moved[2:], logits[2:])
    (logits.mean() + r1_penalty(D, x)).backward()
    assert _has_grads(D)
    with pytest.raises(ValueError, match="multiple of 2"):
        D(torch.randn(3, 3, 8, 8))


def test_discriminator_is_per_sample() -> None:
    """No cross-sample coupling in D: a sample's logit does not depend on the rest of the batch."""
    torch.manual_seed(0)
    D = DCGANDiscriminator(16, 3, 4, spectral_norm=True).eval()
    x = torch.randn(4, 3, 16, 16)
    assert torch.allclose(D(x)[:2], D(x[:2]), atol=1e-6)


# --- registry ---------------------------------------------------------------------------------

def test_dcgan_rejects_2d_data() -> None:
    with pytest.raises(ConfigError, match="mlp.*data.resolution"):
        build_generator(_cfg(generator="dcgan"), (2,))
    with pytest.raises(ConfigError, match="model.discriminator"):
        build_discriminator(_cfg(discriminator="dcgan"), (3, 12, 12))


def test_unknown_names_raise_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown model.generator 'resnet'.*dcgan.*mlp"):
        build_generator(_cfg(generator="resnet"), (2,))
    with pytest.raises(ConfigError, match="unknown model.discriminator 'resnet'"):
        build_discriminator(_cfg(discriminator="resnet"), (2,))


def test_bad_import_paths_raise_config_error() -> None:
    with pytest.raises(ConfigError, match="model.generator.*cannot import module 'no_such_module_xyz'"):
        build_generator(_cfg(generator="no_such_module_xyz:G"), (2,))
    with pytest.raises(ConfigError, match="model.discriminator.*has no attribute 'Missing'"):
        build_discriminator(_cfg(discriminator="torch.nn:Missing"), (2,))
    with pytest.raises(ConfigError, match="model.generator.*not a class or function"):
        build_generator(_cfg(generator="math:pi"), (2,))
    with pytest.raises(ConfigError, match="not an import path"):
        build_generator(_cfg(generator=":G"), (2,))


_USER_MODULE = '''
import torch
from torch import nn


class TinyG(nn.Module):
    def __init__(self, sample_shape, z_dim, width=4):
        super().__init__()
        self.sample_shape = tuple(sample_shape)
        self.width = width
        self.lin = nn.Linear(z_dim, 2)

    def forward(self, z):
        return self.lin(z)


class TinyD(nn.Module):
    def __init__(self, sample_shape, width=4):
        super().__init__()
        self.width = width
        self.lin = nn.Linear(sample_shape[0], 1)

    def forward(self, x):
        return self.lin(x).squeeze(1)


class WrongShapeD(TinyD):
    def forward(self, x):
        return self.lin(x)


class FixedShapeG(nn.Module):
    """Ignores its arguments: always claims 2D output from a 2D z."""

    def __init__(self, sample_shape, z_dim):
        super().__init__()
        self.z_dim, self.sample_shape = 2, (2,)


def make_g(sample_shape, z_dim):
    return TinyG(sample_shape, z_dim)


def not_a_module(sample_shape, z_dim):
    return 42


def broken(sample_shape, z_dim):
    raise RuntimeError("boom")


NUMBER = 3
'''


@pytest.fixture
def user_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "my_gan_models.py").write_text(textwrap.dedent(_USER_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_gan_models"


def test_import_path_models(user_models: str) -> None:
    cfg = _cfg(generator=f"{user_models}:TinyG", discriminator=f"{user_models}:TinyD", z_dim=3,
               kwargs={"width": 7})
    G, D = build_generator(cfg, (2,)), build_discriminator(cfg, (2,))
    assert type(G).__name__ == "TinyG" and type(D).__name__ == "TinyD"
    assert G.width == 7 and D.width == 7  # kwargs reach the constructors
    assert G.z_dim == 3 and G.sample_shape == (2,)  # z_dim attached by the registry
    assert D(G(torch.randn(4, 3))).shape == (4,)
    # A factory function works as well as a class.
    assert type(build_generator(_cfg(generator=f"{user_models}:make_g"), (2,))).__name__ == "TinyG"


def test_import_path_mistakes(user_models: str) -> None:
    with pytest.raises(ConfigError, match="model.discriminator.*must return shape \\(2,\\).*got \\(2, 1\\)"):
        build_discriminator(_cfg(discriminator=f"{user_models}:WrongShapeD"), (2,))
    with pytest.raises(ConfigError, match="returned a int, not a torch.nn.Module"):
        build_generator(_cfg(generator=f"{user_models}:not_a_module"), (2,))
    with pytest.raises(ConfigError, match="failed to build.*RuntimeError: boom"):
        build_generator(_cfg(generator=f"{user_models}:broken"), (2,))
    with pytest.raises(ConfigError, match="failed to build.*unexpected keyword"):
        build_generator(_cfg(generator=f"{user_models}:TinyG", kwargs={"depth_typo": 2}), (2,))
    with pytest.raises(ConfigError, match="model.kwargs must not set z_dim"):
        build_generator(_cfg(generator=f"{user_models}:TinyG", kwargs={"z_dim": 2}), (2,))
    with pytest.raises(ConfigError, match="sample_shape \\(2,\\) but the data's is \\(3,\\)"):
        build_generator(_cfg(generator=f"{user_models}:FixedShapeG", z_dim=2), (3,))
    with pytest.raises(ConfigError, match="has z_dim 2 but model.z_dim is 8"):
        build_generator(_cfg(generator=f"{user_models}:FixedShapeG"), (2,))
    with pytest.raises(ConfigError, match="model.generator.*must return shape \\(2, 3\\).*got \\(2, 2\\)"):
        build_generator(_cfg(generator=f"{user_models}:TinyG"), (3,))


def test_register_generator(monkeypatch: pytest.MonkeyPatch) -> None:
    import ganray.models.registry as registry

    monkeypatch.setattr(registry, "_GENERATORS", dict(registry._GENERATORS))
    register_generator("tiny", lambda cfg, shape: MLPGenerator(cfg["z_dim"], 4, 1, shape))
    G = build_generator(_cfg(generator="tiny", z_dim=5), (2,))
    assert G.z_dim == 5 and G(torch.randn(2, 5)).shape == (2, 2)
    with pytest.raises(ValueError, match="already registered"):
        register_generator("mlp", lambda cfg, shape: nn.Identity())
    with pytest.raises(ValueError, match="no ':'"):
        register_generator("a:b", lambda cfg, shape: nn.Identity())


# --- EMA --------------------------------------------------------------------------------------

def test_ema_beta() -> None:
    assert ema_beta(1000, 1.0) == 0.5
    assert ema_beta(500, 1.0) == pytest.approx(0.5 ** 0.5)
    assert ema_beta(256, 0.0) == 0.0
    # Same images seen => same total decay, whatever the batch size.
    assert ema_beta(64, 10.0) ** 4 == pytest.approx(ema_beta(256, 10.0))


def test_update_ema_by_hand() -> None:
    model = nn.Sequential(nn.Linear(1, 1), nn.BatchNorm1d(1))
    ema = copy.deepcopy(model)
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        ema[0].weight.fill_(0.0)
        model[1].running_mean.fill_(3.0)
    EmaPair(ema, model).update(0.5)
    assert ema[0].weight.item() == pytest.approx(0.5)  # 0.5*0 + 0.5*1
    assert ema[1].running_mean.item() == 3.0  # buffers copied, not averaged
    with torch.no_grad():
        model[0].weight.fill_(3.0)
    EmaPair(ema, model).update(0.75)
    assert ema[0].weight.item() == pytest.approx(0.75 * 0.5 + 0.25 * 3.0)  # = 1.125
    assert model[0].weight.item() == 3.0  # the source is untouched
    EmaPair(ema, model).update(0.0)
    assert torch.equal(ema[0].weight, model[0].weight)


def test_update_ema_with_spectral_norm_and_mismatch() -> None:
    G = DCGANGenerator(4, 8, 1, 4, spectral_norm=True)
    ema = copy.deepcopy(G)
    with torch.no_grad():
        for p in G.parameters():
            p.add_(1.0)
    EmaPair(ema, G).update(0.9)
    for pe, p in zip(ema.parameters(), G.parameters()):
        assert torch.allclose(pe, p - 0.9, atol=1e-6)
    with pytest.raises(ValueError, match="different architectures"):
        EmaPair(MLPGenerator(4, 8, 1), MLPGenerator(4, 8, 2)).update(0.5)
