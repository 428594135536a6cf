"""The `energy` learner (issue 17): D alone, its negatives found by a Langevin search over its own
score from a replay buffer. Small ring8 jobs, a few hundred rounds at most."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from ganray.models.energy import EnergySampler, SearchSettings, langevin_search
from ganray.models.errors import ConfigError
from ganray.models.metrics2d import evaluate_2d, mixture_modes
from ganray.models.nets import MLPDiscriminator
from ganray.models.registry import build_sampling_module
from ganray.orchestrator.job.config import config_from_dict
from ganray.orchestrator.job.engine import LocalEngine
from ganray.orchestrator.job.learner_keys import for_learner
from ganray.workers.stepper import build_replica
from helpers import run_cli, small_config, small_tree, ThreadMean


def _config(**sections):
    """The small job on ring8 as an energy learner: a short search (20 steps; samples search
    20 / 0.05 = 400) and a quick D, which learns ring8 within 300 rounds."""
    gan = small_config(data={"name": "ring8", "size": 2048}, model={"hidden": 64},
                       schedule={"d_lr": 2e-3, "betas": [0.5, 0.999]})
    tree = for_learner(gan, "energy").model_dump(mode="json")
    tree["model"]["energy_steps"] = 20
    for key, value in sections.items():
        tree[key].update(value)
    return config_from_dict(tree)


def _uniform(n: int, d: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, d, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_the_search_climbs_d_and_leaves_d_alone() -> None:
    torch.manual_seed(0)
    D = MLPDiscriminator(32, 2, (2,))
    before = [p.detach().clone() for p in D.parameters()]
    starts = _uniform(256, 2) * 1.5
    gen = torch.Generator().manual_seed(1)
    found = langevin_search(D, starts, SearchSettings(steps=30, step_size=0.5, noise=0.01), 1.5,
                            lambda _: torch.randn(starts.shape, generator=gen))
    with torch.no_grad():
        gain = D(found) - D(starts)
    assert gain.mean() > 0 and (gain > 0).float().mean() > 0.9, gain
    assert found.abs().max() <= 1.5  # kept inside the start box
    assert all(torch.equal(a, b) for a, b in zip(before, D.parameters()))
    assert all(p.grad is None for p in D.parameters()) and D.training

    # The sampling module: the same z gives the same samples, under no_grad and inference mode
    # (evaluation's), and each sample costs the search's steps in D evaluations.
    sampler = EnergySampler(D, (2,), SearchSettings(steps=30, step_size=0.5, noise=0.01), start_range=1.5)
    z = _uniform(64, 2, seed=2)
    with torch.no_grad():
        a = sampler(z)
    with torch.inference_mode():
        b = sampler(z)
    assert torch.equal(a, b) and sampler.evals_per_sample == 30 and sampler.z_dim == 2
    with torch.no_grad():
        assert (D(a) - D(sampler.starts(z))).mean() > 0
        assert not torch.equal(a, sampler(_uniform(64, 2, seed=3)))


def test_energy_learns_ring8_from_its_own_negatives() -> None:
    cfg = _config()
    stepper = build_replica(cfg.model_dump())
    initial_noise = stepper.buffer.entries.clone()  # the buffer starts as uniform noise over the box
    real = stepper.source.data
    out = stepper.run_rounds(300)
    m = out["metrics"]
    assert out["images_seen"] == 300 * 64
    with torch.no_grad():
        real_score, noise_score = stepper.D(real).mean().item(), stepper.D(initial_noise).mean().item()
    # D scores the data above the noise it started from...
    assert real_score > noise_score + 0.1, (real_score, noise_score)
    # ...and its search raises its score, round after round (each negative scored before D steps).
    gains = np.array(m["D/fake_score"]) - np.array(m["energy/start_score"])
    assert (gains[-100:] > 0).all(), gains[-100:]
    assert set(m["energy/evals_per_sample"]) == {20.0}
    assert 0.0 < np.mean(m["energy/reinit_fraction"]) < 0.15

    sampler = stepper.sampling_module()
    assert sampler.evals_per_sample == 400  # energy_steps / energy_reinit
    with torch.no_grad():
        samples = sampler(_uniform(1000, 2, seed=1000))
    quality = evaluate_2d(samples, *mixture_modes("ring8"))
    assert quality["modes"] == 8 and quality["hq"] > 0.8, quality

    # What evaluation and releases load: the same module rebuilt from the config and its state.
    rebuilt = build_sampling_module(cfg.model.model_dump(), (2,))
    rebuilt.load_state_dict(stepper.state()["G_ema"])
    with torch.no_grad():
        z = _uniform(50, 2, seed=7)
        torch.testing.assert_close(rebuilt(z), sampler(z), rtol=0, atol=0)


def test_resume_is_exact_with_the_replay_buffer() -> None:
    cfg = _config().model_dump()
    first = build_replica(cfg)
    first.run_rounds(10)
    state = first.state()
    assert {"D", "D_ema", "replay", "opt_D", "G_ema"} <= set(state)
    second = build_replica(cfg)
    assert not torch.equal(second.buffer.entries, state["replay"]["entries"])  # the searches wrote to it
    second.load_state(state)
    assert torch.equal(second.buffer.entries, first.buffer.entries)
    a, b = first.run_rounds(10), second.run_rounds(10)
    assert a["metrics"] == b["metrics"] and a["images_seen"] == b["images_seen"] == 20 * 64
    for x, y in zip(first.modules(), second.modules()):
        for (name, p), q in zip(x.state_dict().items(), y.state_dict().values()):
            assert torch.equal(p, q), name


def test_one_replica_reproduces_local(ray_session) -> None:
    from ganray.orchestrator.job.coordinator import RayEngine

    local = LocalEngine(_config())
    expected = local.run(30)
    engine = RayEngine(_config(topology={"kind": "replicated", "num_workers": 1}))
    try:
        got = engine.run(30)
        assert got.images_seen == expected.images_seen == 30 * 64
        assert got.metrics.keys() == expected.metrics.keys()
        for key in expected.metrics:
            np.testing.assert_allclose(got.metrics[key], expected.metrics[key], rtol=0, atol=1e-5, err_msg=key)
        sampler_state = engine.generator_state()
    finally:
        engine.close()
    ref = local.generator_state()
    assert sampler_state.keys() == ref.keys() and "start_range" in ref
    for key in ref:
        torch.testing.assert_close(sampler_state[key], ref[key], rtol=0, atol=1e-5)
    assert np.ptp(expected.metrics["loss/D"]) > 1e-4


def test_two_replicas_search_their_halves_and_share_one_buffer() -> None:
    """Every draw is made for the global batch and sliced, and the negatives are gathered
    before they go back: two replicas hold the buffer one replica would."""
    cfg = _config().model_dump()
    single = build_replica(cfg)
    expected = single.run_rounds(15)
    reduce = ThreadMean(2)
    replicas = [build_replica(cfg, rank, 2, reduce.hook(rank)) for rank in range(2)]
    results: list = [None, None]

    def run(rank: int) -> None:
        results[rank] = replicas[rank].run_rounds(15)

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert torch.equal(replicas[0].buffer.entries, replicas[1].buffer.entries)
    torch.testing.assert_close(replicas[0].buffer.entries, single.buffer.entries, rtol=0, atol=1e-5)
    merged = {k: np.mean([results[0]["metrics"][k], results[1]["metrics"][k]], axis=0) for k in expected["metrics"]}
    for key in ("loss/D", "D/real_score", "D/fake_score", "energy/start_score"):
        np.testing.assert_allclose(merged[key], expected["metrics"][key], rtol=1e-5, atol=1e-6, err_msg=key)


def test_bad_energy_settings_are_one_line() -> None:
    with pytest.raises(ConfigError, match="model.z_dim is not read by model.learner 'energy'"):
        config_from_dict(small_tree(model={"learner": "energy", "z_dim": 8}, schedule={"ema_half_life_kimg": 1}))
    with pytest.raises(ConfigError, match="model.pack"):
        config_from_dict(small_tree(model={"learner": "energy", "pack": 2}))
    with pytest.raises(ConfigError, match=r"model.energy_buffer \(32\) must be at least schedule.batch_size \(64\)"):
        build_replica(_config(model={"energy_buffer": 32}).model_dump())


def test_a_stopped_run_resumes_exactly_from_its_checkpoint_and_samples(mlflow_store) -> None:
    """Through the trainer: the replay buffer and D_ema travel in the checkpoint files, and
    `ganray sample --run` rebuilds the sampling module from the run's last checkpoint."""
    from ganray.orchestrator.job.trainer import Trainer

    cfg = _config(schedule={"total_kimg": 1, "sync_kimg": 0.25, "checkpoint_kimg": 0.5})
    released = _config(schedule={"total_kimg": 1, "sync_kimg": 0.25, "checkpoint_kimg": 0.5},
                       tracking={"model_name": "energy-ring8"})
    full = Trainer(released, progress=False).run()
    assert full.model_version == "1"  # D's state and the sampler settings, released without a pt2
    first = Trainer(cfg, progress=False, stop_at_kimg=0.5).run()
    rest = Trainer(cfg, progress=False, resume=first.run_id).run()
    done = len(first.history["loss/D"])
    assert done == 8 and rest.images_seen == full.images_seen == 16 * 64
    for key in ("loss/D", "D/fake_score", "energy/start_score", "grad_norm/D"):
        assert rest.history[key] == full.history[key][done:], key

    code, out, err = run_cli(["sample", "--run", full.run_id, "-n", "20", "--out", str(mlflow_store / "s.npy")])
    assert code == 0, err
    samples = np.load(mlflow_store / "s.npy")
    assert samples.shape == (20, 2) and np.isfinite(samples).all() and np.abs(samples).max() <= 1.3
    # The registered release: `sample` and `evaluate` rebuild the search from D and its settings.
    code, out, err = run_cli(["sample", "--model", "models:/energy-ring8/1", "-n", "20", "--out",
                              str(mlflow_store / "r.npy")])
    assert code == 0 and "shape=20x2" in out, err
    assert np.array_equal(np.load(mlflow_store / "r.npy"), samples)  # the same D_ema, the same search
    code, out, err = run_cli(["evaluate", "--model", "models:/energy-ring8/1"])
    assert code == 0 and {line.split("=")[0] for line in out.split()} == {"modes", "hq", "kl"}, err
