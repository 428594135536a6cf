"""The payload counter against docs/scaling.md's formula: a 2-replica run's counted bytes per
round (`ChunkResult.comm_bytes`, from `Collective.sent_bytes`) equal the formula exactly, on the
shared-memory path (`collective: auto`, one host) and on gloo's (`collective: gloo`).

Real Ray (the session's instance), the tiny MLP of tests/helpers.py with two D steps per round,
so the formula's n_critic * P_D + P_G structure is what is checked, not one buffer's size. The
two engines start at once: their actors' start-up (a torch import each) is most of the time.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from helpers import small_config
from ganray.bench.payload import model_sizes, replicated_round
from ganray.orchestrator.job.coordinator import RayEngine

ROUNDS = 5
N_CRITIC = 2
# collective -> (the formula's path, words the engine's `allreduce` must contain)
PATHS = {"auto": ("shared", "shared memory"), "gloo": ("gloo", "pairwise exchange")}


def _config(collective: str):
    return small_config(topology={"kind": "replicated", "num_workers": 2}, schedule={"n_critic": N_CRITIC},
                        resources={"cpus_per_worker": 0.5, "collective": collective})


def test_two_replicas_send_the_formulas_bytes_per_round(ray_session) -> None:
    with ThreadPoolExecutor(len(PATHS)) as pool:
        starting = {c: pool.submit(RayEngine, _config(c)) for c in PATHS}
    engines, failed = {}, []
    for collective, future in starting.items():  # every start has finished here; none is left open
        try:
            engines[collective] = future.result()
        except Exception as err:  # noqa: BLE001 - re-raised below, once the others are closed
            failed.append(err)
    try:
        if failed:
            raise failed[0]
        for collective, engine in engines.items():
            path, words = PATHS[collective]
            assert words in engine.allreduce, engine.allreduce  # the formula's path is the one that ran
            first = engine.run(ROUNDS)
            second = engine.run(ROUNDS)  # a chunk counts only its own rounds
            p_g, p_d = model_sizes(_config(collective), (2,))
            expected = replicated_round(p_g, p_d, N_CRITIC, 2, path)
            assert expected == (N_CRITIC * p_d + p_g) * 4  # w=2: every path sends each buffer once
            assert first.rounds == second.rounds == ROUNDS
            assert (collective, first.comm_bytes, second.comm_bytes) == (collective, ROUNDS * expected,
                                                                         ROUNDS * expected)
    finally:
        for engine in engines.values():
            engine.close()
