"""`resources.compile`: the phase steps through torch.compile give the eager round's results, the
double-backward terms (R1, R2, the WGAN gradient penalty) run eagerly, and the setting is refused
where it would do nothing.

The backend here is `aot_eager`: the same dynamo capture and AOT autograd graphs as `inductor`,
without its C++ build, so the test checks the tracing and the routing in seconds. inductor's
results against eager are checked by `ganray bench compile` on every run (its `equality` entry).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from helpers import small_config

from ganray.models.errors import ConfigError
from ganray.workers.stepper import build_replica


def _trained(compile_on: bool, loss: dict[str, Any], rounds: int = 6) -> tuple[Any, dict[str, list[float]]]:
    """A replica after `rounds` rounds (2 D steps each), and its per-round statistics."""
    cfg = small_config(loss=loss, schedule={"n_critic": 2},
                       resources={"compile": compile_on, "compile_backend": "aot_eager"})
    replica = build_replica(cfg.model_dump())
    return replica, replica.run_rounds(rounds)["metrics"]


@pytest.mark.parametrize("loss", [
    {"kind": "nonsaturating", "r1_gamma": 0.1, "r2_gamma": 0.1, "r1_interval": 2},
    {"kind": "wgan-gp", "gp_weight": 10.0},
], ids=["r1-r2-lazy", "wgan-gp"])
def test_compiled_round_matches_eager(loss: dict[str, Any]) -> None:
    (eager, eager_stats), (fast, fast_stats) = _trained(False, loss), _trained(True, loss)
    assert fast.disc.D_step is not fast.disc.D and fast.gen.G_step is not fast.gen.G  # compiled wrappers ran
    assert eager.disc.D_step is eager.disc.D
    for mine, theirs in zip(fast.modules(), eager.modules()):
        for (name, a), b in zip(mine.state_dict().items(), theirs.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    # The double-backward terms ran (eagerly, inside the compiled round) and agree too.
    terms = [name for name in ("loss/R1", "loss/R2", "loss/GP") if name in eager_stats]
    assert terms and all(max(fast_stats[t]) > 0 for t in terms)
    for name in (*terms, "loss/D", "loss/G"):
        torch.testing.assert_close(torch.tensor(fast_stats[name]), torch.tensor(eager_stats[name]), rtol=1e-4,
                                   atol=1e-5)


def test_compile_is_refused_for_a_learner_it_does_not_wrap() -> None:
    with pytest.raises(ConfigError, match="resources.compile is not read by model.learner 'ae'"):
        small_config(model={"learner": "ae"}, resources={"compile": True})
