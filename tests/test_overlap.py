"""The replica round with its gradient all-reduces overlapped: the same values as the plain
sequential round, the gradients untouched while in flight, and the overlap really taking place."""

from __future__ import annotations

import pytest
import torch

from ganray.workers.noise import ALPHA_SLOT, G_NOISE_SLOT, G_SLOT
from ganray.workers.phases import table_of
from ganray.workers.stats import GRAD_NORM_G, RoundStats
from ganray.workers.stepper import ReplicaStepper, build_replica
from helpers import small_config


def _stepper(cfg, start_sync=None) -> ReplicaStepper:
    return build_replica(cfg.model_dump(), start_sync=start_sync)


def _sequential_round(st: ReplicaStepper) -> None:
    """The round table run phase after phase, each phase's step right after its backward, both
    learning rates set at the start of the round."""
    s = st.settings
    B, r = s.global_batch, st.progress.rounds
    table = table_of(s)
    kimg = st.progress.kimg
    st.gen.apply_hyper(kimg)
    st.disc.apply_hyper(kimg)
    std = s.noise_std(kimg)
    stats = RoundStats()
    for phase in table.d_steps:
        k = phase.step
        real = st.batches.next(st.sampler)
        z = st.noise.latent(st.gen.latent, r, k, (B, st.gen.z_dim), 0, 1)
        real, fake = st.noise.noisy_d_inputs(real, st.gen.generate(z), std, r, k, B, 0, 1)
        alpha = st.noise.uniform(r, ALPHA_SLOT + k, B, 0, 1) if s.loss_kind == "wgan-gp" else None
        st.disc.d_step(phase, real, fake, alpha, st.progress.d_steps, stats)
        st.progress.d_steps += 1
    z = st.noise.latent(st.gen.latent, r, G_SLOT, (B, st.gen.z_dim), 0, 1)
    fake_g = st.noise.add_noise(st.gen.forward_with_graph(z), std, r, G_NOISE_SLOT, B, 0, 1)
    st.disc.g_loss(fake_g, real).backward()
    st.gen.apply(stats)
    st.gen.update_ema()
    st.progress.end_round(table, B)


class _RecordingSync:
    """A one-replica 'all-reduce' that checks the gradients stay untouched while in flight and
    logs when each phase's sync starts and ends, and when D runs a forward pass."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.stepper: ReplicaStepper | None = None

    def __call__(self, grads):
        present = [g for g in grads if g is not None]
        snapshot = [g.clone() for g in present]
        assert self.stepper is not None
        phase = "G" if present[0] is self.stepper.gen.params[0].grad else "D"
        self.events.append(f"start {phase}")
        events = self.events

        class Pending:
            def wait(self) -> None:
                for before, now in zip(snapshot, present):
                    assert torch.equal(before, now), f"{phase} gradients changed while in flight"
                events.append(f"wait {phase}")

        return Pending()


def _states(st: ReplicaStepper) -> list[dict[str, torch.Tensor]]:
    return [st.gen.G.state_dict(), st.disc.D.state_dict(), st.gen.G_ema.state_dict(),
            {"d_steps": torch.tensor(st.progress.d_steps)}]


@pytest.mark.parametrize("loss", [
    {"kind": "nonsaturating", "r1_gamma": 0.5, "r1_interval": 2, "instance_noise": 0.3, "instance_noise_kimg": 2},
    {"kind": "wgan-gp"},
    {"kind": "relativistic", "r1_gamma": 0.5, "r2_gamma": 0.5, "r1_interval": 2},
])
def test_overlapped_round_equals_the_sequential_round(loss) -> None:
    # A learning rate that changes every round: the deferred G step must use its own round's.
    cfg = small_config(loss=loss, schedule={"n_critic": 2, "lr_decay": "linear", "lr_decay_kimg": 2,
                                            "lr_min_factor": 0.1})
    recorder = _RecordingSync()
    overlapped = _stepper(cfg, start_sync=recorder)
    recorder.stepper = overlapped
    reference = _stepper(cfg)
    chunks = [3, 1, 4]
    for n in chunks:
        out = overlapped.run_rounds(n)
        assert out["rounds"] == n and len(out["metrics"][GRAD_NORM_G]) == n
        assert all(v > 0 for v in out["metrics"][GRAD_NORM_G])  # filled in once G stepped
    for _ in range(sum(chunks)):
        _sequential_round(reference)
    assert overlapped.rounds == reference.rounds and overlapped.images_seen == reference.images_seen
    for mine, theirs in zip(_states(overlapped), _states(reference)):
        for key in theirs:
            assert torch.equal(mine[key], theirs[key]), key
    assert overlapped.gen.opt.param_groups[0]["lr"] == reference.gen.opt.param_groups[0]["lr"]


def test_reduces_overlap_the_other_networks_work() -> None:
    cfg = small_config(schedule={"n_critic": 1})
    recorder = _RecordingSync()
    stepper = _stepper(cfg, start_sync=recorder)
    recorder.stepper = stepper
    stepper.disc.D.register_forward_hook(lambda *_: recorder.events.append("D forward"))
    stepper.gen.G.register_forward_hook(lambda *_: recorder.events.append("G forward"))
    stepper.run_rounds(2)
    events = recorder.events
    # D's reduce is in flight during G's forward for the G step...
    first_d = events.index("start D")
    assert events[first_d:events.index("wait D")] == ["start D", "G forward"]
    # ...and G's reduce during the next round's forward of D on the real rows.
    first_g = events.index("start G")
    assert events[first_g:events.index("wait G")] == ["start G", "D forward"]
    # The chunk ends with no G step left pending.
    assert events[-2:] == ["start G", "wait G"]
    assert events.count("start G") == events.count("wait G") == 2
