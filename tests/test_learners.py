"""The `ae` and `vae` learners (issue 17): each trained by its own loss and sampled its own way,
by the same engines, checkpoints, resume and releases as the GAN. Small 2D jobs, few rounds."""

from __future__ import annotations

import math
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from ganray.orchestrator.job.config import config_from_dict
from ganray.orchestrator.job.learner_keys import for_learner
from ganray.orchestrator.job.engine import LocalEngine
from ganray.workers.stepper import build_replica
from helpers import run_cli, small_config, small_tree, ThreadMean


def _config(learner: str, **sections):
    """The small job on ring8 (radius 1) for `learner`, the keys it does not read back at their
    defaults, then `sections` (dicts of keys) over it."""
    gan = small_config(data={"name": "ring8", "size": 2048}, model={"z_dim": 2, "hidden": 64},
                       schedule={"g_lr": 1e-3, "betas": [0.9, 0.999]})
    tree = for_learner(gan, learner).model_dump(mode="json")
    for key, value in sections.items():
        tree[key].update(value)
    return config_from_dict(tree)


def _draw(module: torch.nn.Module, n: int = 2000) -> torch.Tensor:
    with torch.no_grad():
        return module(torch.randn(n, module.z_dim, generator=torch.Generator().manual_seed(0)))


def test_ae_reconstructs_its_training_points_and_samples_from_its_fitted_codes() -> None:
    stepper = build_replica(_config("ae", model={"ae_noise": 0.5}).model_dump())
    points = stepper.source.data[:512]

    def error() -> torch.Tensor:
        with torch.no_grad():
            return (stepper.decoder(stepper.encoder(points)) - points).norm(dim=1)

    before = error().median().item()
    out = stepper.run_rounds(300)
    after = error()
    assert before > 0.3 and after.median().item() < 0.05 and after.max().item() < 0.2, (before, after.max())
    losses = out["metrics"]["loss/reconstruction"]
    assert losses[-1] < losses[0] / 100
    # The code Gaussian is the running mean and covariance of the codes of the batches it saw.
    with torch.no_grad():
        codes = stepper.encoder(stepper.source.data)
    assert torch.allclose(stepper.codes.mean, codes.mean(dim=0), atol=0.1 * codes.std(dim=0).max().item())
    sampler = stepper.sampling_module()
    assert sampler.z_dim == 4 and torch.allclose(sampler.code_root @ sampler.code_root.T,
                                                 stepper.codes.covariance(), atol=1e-5)
    samples = _draw(sampler)
    assert samples.shape == (2000, 2) and torch.isfinite(samples).all()
    # Noise of std ae_noise on the codes moves the samples; without it they are the decoder's
    # image of the fitted Gaussian.
    sampler.ae_noise.zero_()
    assert not torch.allclose(_draw(sampler), samples)


def test_vae_kl_is_finite_and_its_samples_spread() -> None:
    stepper = build_replica(_config("vae").model_dump())
    out = stepper.run_rounds(300)
    kl = out["metrics"]["loss/KL"]
    assert all(math.isfinite(v) for v in kl) and kl[-1] > 0.5  # the codes carry the data
    elbo = out["metrics"]["loss/VAE"]
    assert elbo[-1] < elbo[0] - 10
    samples = _draw(stepper.sampling_module())
    assert torch.isfinite(samples).all() and (samples.std(dim=0) > 0.4).all(), samples.std(dim=0)
    # Spread over the ring's eight modes and smeared between them: many samples lie far from
    # every mode, where ring8 (std 0.01) has none.
    angles = torch.atan2(samples[:, 1], samples[:, 0])
    sectors = torch.floor((angles + math.pi / 8) / (math.pi / 4)).remainder(8)
    assert len(torch.unique(sectors)) == 8
    modes = torch.tensor([[math.cos(k * math.pi / 4), math.sin(k * math.pi / 4)] for k in range(8)])
    assert (torch.cdist(samples, modes).min(dim=1).values > 0.1).float().mean() > 0.3


@pytest.mark.parametrize("learner", ["ae", "vae"])
def test_state_holds_everything_and_restores_exactly(learner: str) -> None:
    cfg = _config(learner).model_dump()
    first = build_replica(cfg)
    first.run_rounds(20)
    state = first.state()
    if learner == "ae":
        assert {"encoder", "decoder", "codes", "opt_AE", "G_ema"} <= set(state)
        assert set(state["codes"]) == {"mean", "second", "batches"} and state["codes"]["batches"].item() == 20
    else:
        assert {"vae", "opt_VAE", "G_ema"} <= set(state)
    second = build_replica(cfg)
    second.load_state(state)
    a, b = first.run_rounds(15), second.run_rounds(15)
    assert a["metrics"] == b["metrics"] and a["images_seen"] == b["images_seen"] == 35 * 64
    for x, y in zip(first.modules(), second.modules()):
        for (name, p), q in zip(x.state_dict().items(), y.state_dict().values()):
            assert torch.equal(p, q), name


def _close(a: dict, b: dict, rtol: float) -> None:
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=rtol, atol=1e-5, err_msg=key)


def test_ae_one_replica_reproduces_local(ray_session) -> None:
    from ganray.orchestrator.job.coordinator import RayEngine

    local = LocalEngine(_config("ae"))
    expected = local.run(40)
    engine = RayEngine(_config("ae", topology={"kind": "replicated", "num_workers": 1}))
    try:
        got = engine.run(40)
        assert got.images_seen == expected.images_seen == 40 * 64
        _close(got.metrics, expected.metrics, rtol=0)
        sampler_state = engine.generator_state()
    finally:
        engine.close()
    ref = local.generator_state()
    assert sampler_state.keys() == ref.keys() and "code_root" in ref
    for key in ref:
        torch.testing.assert_close(sampler_state[key], ref[key], rtol=0, atol=1e-5)
    assert np.ptp(expected.metrics["loss/reconstruction"]) > 1e-3


@pytest.mark.parametrize("learner", ["ae", "vae"])
def test_two_replicas_average_into_the_global_batch(learner: str) -> None:
    """Two replicas (threads here; actors in a job) read half a batch each and average their
    gradients, and the AE its batch code moments, through the hook: they step like one replica."""
    cfg = _config(learner).model_dump()
    expected = build_replica(cfg).run_rounds(30)
    reduce = ThreadMean(2)
    replicas = [build_replica(cfg, rank, 2, reduce.hook(rank)) for rank in range(2)]
    results: list = [None, None]

    def run(rank: int) -> None:
        results[rank] = replicas[rank].run_rounds(30)

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results[0]["images_seen"] == expected["images_seen"] == 30 * 64
    # Each replica reports its own half's losses; their mean is the global batch's.
    merged = {k: np.mean([results[0]["metrics"][k], results[1]["metrics"][k]], axis=0) for k in expected["metrics"]}
    # rtol: the VAE's NLL is ~60 here, where float32 resolves ~4e-6 and two halves sum in another order.
    _close(merged, expected["metrics"], rtol=1e-5)
    for a, b in zip(replicas[0].modules(), replicas[1].modules()):
        for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(p, q), name  # the replicas agree exactly


def test_ae_resumes_exactly_and_its_release_samples_and_evaluates(mlflow_store) -> None:
    from ganray.orchestrator.job.trainer import Trainer

    cfg = _config("ae", schedule={"total_kimg": 2, "sync_kimg": 0.25}, tracking={"model_name": "ae-ring8"})
    full = Trainer(cfg, progress=False).run()
    assert full.model_version == "1"
    first = Trainer(cfg, progress=False, stop_at_kimg=1).run()
    rest = Trainer(cfg, progress=False, resume=first.run_id).run()
    done = len(first.history["loss/reconstruction"])
    assert done == 16 and rest.images_seen == full.images_seen
    for key in ("loss/reconstruction", "AE/code_std", "grad_norm/AE"):
        assert rest.history[key] == full.history[key][done:], key

    code, out, err = run_cli(["sample", "--model", "models:/ae-ring8/1", "-n", "10", "--out",
                              str(mlflow_store / "ae.npy")])
    assert code == 0 and "shape=10x2" in out, err
    assert np.isfinite(np.load(mlflow_store / "ae.npy")).all()
    code, out, err = run_cli(["evaluate", "--run", rest.run_id])
    assert code == 0 and {line.split("=")[0] for line in out.split()} == {"modes", "hq", "kl"}, err


@pytest.mark.parametrize("sets,message", [
    (["model.learner=autoencoder"], "model.learner must be one of"),
    (["model.learner=ae", "topology.kind=split"], "topology.kind 'split' trains a GAN"),
    (["model.learner=vae", "loss.kind=hinge"], "loss.kind is not read by model.learner 'vae'"),
    (["model.learner=vae", "model.ae_noise=0.1"], "model.ae_noise is not read by model.learner 'vae'"),
    (["model.ae_noise=0.1"], "model.ae_noise is not read by model.learner 'gan'"),
])
def test_bad_learner_config_is_one_line_exit_2(tmp_path: Path, sets: list[str], message: str) -> None:
    path = tmp_path / "job.yaml"
    tree = small_tree()
    del tree["schedule"]["ema_half_life_kimg"]  # not read by the vae: keep the file about the key under test
    path.write_text(yaml.safe_dump(tree))
    argv = ["validate", str(path)]
    for text in sets:
        argv += ["--set", text]
    code, _, err = run_cli(argv)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("command", ["tune", "retrain"])
def test_tune_and_retrain_refuse_other_learners(tmp_path: Path, command: str) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(_config("ae").model_dump(mode="json")))
    search = tmp_path / "search.yaml"
    search.write_text("metric: kl\n")
    extra = ["--search", str(search)] if command == "tune" else ["--model-name", "m"]
    code, _, err = run_cli([command, str(path), *extra])
    assert code == 2 and f"ganray {command} takes GAN configs only" in err, err
    assert len(err.strip().splitlines()) == 1


def test_dry_run_builds_the_learners_own_networks(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(_config("ae").model_dump(mode="json")))
    code, out, err = run_cli(["train", str(path), "--dry-run"])
    assert code == 0, err
    sizes = dict(line.split("=", 1) for line in out.splitlines() if line.startswith("params_"))
    # encoder 2-64-64-2 and decoder 2-64-64-2 MLPs (depth 2): 4,482 parameters each; the code
    # Gaussian holds buffers only.
    assert sizes == {"params_encoder": "4482", "params_decoder": "4482", "params_codes": "0"}
