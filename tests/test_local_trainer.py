"""The local reference trainer: determinism, the round semantics, learning on grid25."""

from __future__ import annotations

import math

import pytest
import torch

from ganray.models.errors import CheckpointError, ConfigError
from ganray.orchestrator.job.engine import LocalEngine
from ganray.orchestrator.job.trainer import Trainer
from ganray.workers.stats import SKIPPED
from ganray.workers.stepper import build_replica
from helpers import small_config


def _losses(cfg, rounds):
    engine = LocalEngine(cfg)
    out = engine.run(rounds)
    return out.metrics["loss/D"], out.metrics["loss/G"], engine


def test_local_is_deterministic():
    cfg = small_config(loss={"r1_gamma": 0.5, "r1_interval": 2})
    d1, g1, _ = _losses(cfg, 15)
    d2, g2, _ = _losses(cfg, 15)
    assert d1 == d2 and g1 == g2
    d3, _, _ = _losses(small_config(seed=1), 15)
    assert d3 != d1


def test_round_counts_images_of_the_discriminator():
    cfg = small_config(schedule={"n_critic": 3, "batch_size": 32})
    engine = LocalEngine(cfg)
    out = engine.run(4)
    assert out.rounds == 4 and out.images_seen == 4 * 3 * 32
    assert engine.stepper.progress.d_steps == 12


def test_every_loss_kind_trains_finitely():
    for kind in ("minimax", "nonsaturating", "wgan-gp", "hinge", "relativistic"):
        d, g, _ = _losses(small_config(loss={"kind": kind}), 5)
        assert all(math.isfinite(v) for v in d + g), kind


def test_state_round_trip_continues_identically():
    cfg = small_config()
    a = LocalEngine(cfg)
    a.run(5)
    snapshot = a.state()
    tail_a = a.run(5).metrics["loss/D"]
    b = LocalEngine(cfg)
    b.load_state(snapshot)
    tail_b = b.run(5).metrics["loss/D"]
    assert tail_a == tail_b


def test_lr_decay_uses_absolute_kimg():
    cfg = small_config(schedule={"lr_decay": "linear", "lr_decay_kimg": 10, "lr_min_factor": 0.0})
    engine = LocalEngine(cfg)
    settings = engine.stepper.settings
    assert settings.lr_factor(0) == 1.0 and abs(settings.lr_factor(5) - 0.5) < 1e-12
    assert settings.lr_factor(20) == 0.0
    engine.run(40)  # 40 * 64 images = 2.56 kimg
    lr = engine.stepper.gen.opt.param_groups[0]["lr"]
    assert abs(lr - cfg.schedule.g_lr * settings.lr_factor(engine.stepper.images_seen / 1000 - 0.064)) < 1e-9


def test_instance_noise_decays_over_absolute_kimg_or_stays_constant():
    annealed = LocalEngine(small_config(loss={"instance_noise": 0.4, "instance_noise_kimg": 2})).stepper.settings
    assert annealed.noise_std(0) == 0.4 and abs(annealed.noise_std(1) - 0.2) < 1e-12
    assert annealed.noise_std(2) == 0.0 == annealed.noise_std(50)
    constant = LocalEngine(small_config(loss={"instance_noise": 0.1})).stepper.settings
    assert constant.noise_std(0) == constant.noise_std(1e6) == 0.1
    assert LocalEngine(small_config()).stepper.settings.noise_std(0) == 0.0
    # Once the noise has decayed, a round is the noise-free round again: the same D-step losses
    # for the same weights and batch as a job that never had noise.
    noisy = LocalEngine(small_config(loss={"instance_noise": 0.4, "instance_noise_kimg": 0.064}))
    clean = LocalEngine(small_config())
    clean.load_state(noisy.state())
    first_noisy, first_clean = noisy.run(1).metrics["loss/D"][0], clean.run(1).metrics["loss/D"][0]
    assert first_noisy != first_clean
    clean.load_state(noisy.state())
    assert noisy.run(3).metrics["loss/D"] == clean.run(3).metrics["loss/D"]


def test_short_grid25_run_improves_quality():
    cfg = small_config(data={"name": "grid25", "size": 20000},
                       model={"z_dim": 8, "hidden": 64, "depth": 3},
                       schedule={"total_kimg": 60, "batch_size": 128, "g_lr": 1e-3, "d_lr": 1e-3,
                                 "sync_kimg": 10, "ema_half_life_kimg": 2},
                       eval={"every_kimg": 30, "num_samples": 1000}, tracking={"enabled": False})
    trainer = Trainer(cfg, progress=False)
    from ganray.orchestrator.job.evaluate import Evaluator
    from ganray.orchestrator.job.engine import build_eval_generator

    engine = LocalEngine(cfg)
    before = Evaluator(cfg).evaluate(build_eval_generator(cfg, (2,), engine.generator_state()))
    result = trainer.run()
    after = result.eval
    assert after["modes"] > before["modes"]
    assert after["kl"] < before["kl"]


def test_nonfinite_step_is_skipped_without_touching_weights():
    cfg = small_config()
    engine = LocalEngine(cfg)
    engine.run(2)
    stepper = engine.stepper
    before = {k: v.clone() for k, v in stepper.disc.D.state_dict().items()}
    real_get = stepper.source.get
    stepper.batches.device_data = None
    stepper.source.get = lambda idx: real_get(idx) * float("nan")  # a poisoned batch
    out = engine.run(1)
    assert out.metrics[SKIPPED][0] >= 1 and out.nonfinite_run == 1
    after = stepper.disc.D.state_dict()
    assert all(bool((before[k] == after[k]).all()) for k in before)
    step_counts = [s["step"] for s in stepper.disc.opt.state_dict()["state"].values()]
    assert all(float(c) == 2.0 for c in step_counts)  # the skipped step did not count
    stepper.source.get = real_get
    assert engine.run(1).nonfinite_run == 0


@pytest.mark.parametrize("poison", [None, float("nan"), float("inf")])
def test_host_and_device_guards_step_and_skip_alike(poison):
    """The CPU branch of `guarded_step` (a Python `if`) and the accelerator's (fused Adam's
    `found_inf`, run here on the CPU) leave the same weights, step counts and skip statistic."""
    from ganray.workers.steps import _step_on_device, _step_on_host, adam_optimizer, grad_norm

    def stepped(step):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LeakyReLU(0.2), torch.nn.Linear(8, 1))
        opt = adam_optimizer(net.parameters(), 1e-2, (0.0, 0.99))
        skips = []
        for i in range(3):
            net(torch.randn(16, 4)).square().mean().backward()
            if poison is not None and i == 1:
                next(net.parameters()).grad[0, 0] = poison
            skips.append(float(step(opt, grad_norm(list(net.parameters())))))
            opt.zero_grad(set_to_none=True)
        return net.state_dict(), [float(s["step"]) for s in opt.state_dict()["state"].values()], skips

    host, device = stepped(_step_on_host), stepped(_step_on_device)
    assert all(torch.equal(host[0][k], device[0][k]) for k in host[0])
    assert host[1] == device[1] == [3.0 if poison is None else 2.0] * 4
    assert host[2] == device[2] == [0.0, 0.0 if poison is None else 1.0, 0.0]


def test_on_eval_hook_sees_every_evaluation_and_the_final_one_once():
    cfg = small_config(schedule={"total_kimg": 2, "sync_kimg": 0.5}, eval={"every_kimg": 1, "num_samples": 200},
                       tracking={"enabled": False})
    seen = []

    class Overriding(Trainer):  # a subclass that wraps `_evaluate` (as bench_quality does) keeps the hook
        def _evaluate(self, engine, evaluator, images_seen):
            return super()._evaluate(engine, evaluator, images_seen)

    result = Overriding(cfg, progress=False, on_eval=lambda images, scores: seen.append((images, scores))).run()
    # Periodic, then final: the job's last point is evaluated once (no periodic evaluation there).
    assert [images for images, _ in seen] == [1024, 2048]
    assert all(set(scores) == {"modes", "hq", "kl"} for _, scores in seen)
    assert seen[-1][1] == result.eval and seen[-1][1] is not result.eval  # a copy


def test_lazy_r1_and_r2_report_their_terms_on_the_same_d_steps():
    cfg = small_config(loss={"r1_gamma": 0.5, "r2_gamma": 0.5, "r1_interval": 2})
    out = LocalEngine(cfg).run(4)
    for name in ("loss/R1", "loss/R2"):
        values = out.metrics[name]
        assert values[0] > 0 and values[2] > 0, (name, values)  # due on D steps 0 and 2...
        assert values[1] == 0.0 == values[3], (name, values)    # ...and weighed 0 in between
    assert "loss/R2" not in LocalEngine(small_config(loss={"r1_gamma": 0.5})).run(1).metrics
    # R2 reaches D's update: the second round's D loss differs from a run without it.
    plain = LocalEngine(small_config(loss={"r1_gamma": 0.5, "r1_interval": 2})).run(2)
    assert plain.metrics["loss/D"][0] == out.metrics["loss/D"][0]
    assert plain.metrics["loss/D"][1] != out.metrics["loss/D"][1]


def test_set_hyper_refuses_unknown_names_and_a_replica_of_another_world_takes_the_position():
    engine = LocalEngine(small_config())
    with pytest.raises(ConfigError, match="unknown hyperparameter 'lr'; use one of g_lr, d_lr, betas"):
        engine.set_hyper({"lr": 1e-3, "g_lr": 5e-4})
    assert engine.stepper.settings.hyper.g_lr == small_config().schedule.g_lr  # nothing changed
    engine.set_hyper({"r2_gamma": 0.5})
    assert "loss/R2" in engine.run(1).metrics
    state = engine.state()
    assert set(state["sampler"]) == {"rank0"}
    # A state saved at one world size loads at another (elastic worlds, resume at another
    # size): every rank's position is the same number, so rank 1 of 2 takes rank 0's.
    second = build_replica(small_config().model_dump(), rank=1, world=2)
    second.load_state(state)
    assert second.sampler.position == engine.stepper.sampler.position and second.sampler.rank == 1
    state["sampler"] = {"rank0": state["sampler"]["rank0"], "rank2": {**state["sampler"]["rank0"], "position": 3}}
    with pytest.raises(CheckpointError, match="disagree"):
        second.load_state(state)
