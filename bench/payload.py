"""Payload per round: the bytes each rank sends, predicted by formula and counted in real runs.

    python -m ganray.bench.payload [--out docs/bench/payload-2026-12-07] [--rounds 8]

The formulas are docs/scaling.md's, written here independently of the counter they are checked
against (`Collective.sent_bytes`, surfaced per chunk as `ChunkResult.comm_bytes`): a replicated
round is `n_critic` all-reduces of D's gradients and one of G's, each sending what its path's
algorithm sends. A split round moves fakes and dL/dx through Ray's object store; Ray's transfers
are not instrumented, so "counted" there is the size of the tensors the actors return for one
round, times the workers that read each of them, plus the generators' counted all-reduce.

Writes `payload.json` (every row, the model sizes, the predictions for 8 and 64 nodes) into
`--out` and prints the tables docs/scaling.md shows.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any, Optional

from ganray.bench.cases import case_config
from ganray.workers.collective import EXCHANGE_MAX_NUMEL
from ganray.workers.shared_slots import SHARED_MAX_NUMEL
from ganray.workers.split import g_parts_for

FLOAT32 = 4
OUT_DIR = Path("docs/bench/payload-2026-12-07")


# -- the formulas -------------------------------------------------------------------------------
def ring_bytes(numel: int, world: int, elem: int = FLOAT32) -> int:
    """Ring all-reduce (reduce-scatter, then all-gather): 2(w-1)/w of the buffer, rounded down."""
    return 2 * (world - 1) * numel * elem // world


def exchange_bytes(numel: int, world: int, elem: int = FLOAT32) -> int:
    """Recursive doubling: the whole buffer in each of log2(w) swaps."""
    return int(math.log2(world)) * numel * elem


def all_reduce_bytes(numel: int, world: int, path: str, capacity: int, elem: int = FLOAT32) -> int:
    """Bytes one rank sends in one all-reduce of `numel` elements over `world` ranks, by `path`:
    "shared" (`collective: auto`, every rank on one host, CPU), "gloo" (CPU across hosts or
    `collective: gloo`: pairwise exchange or ring by size and world), "ring" (gloo on CUDA
    tensors, or nccl, counted as the bandwidth-optimal ring).

    `capacity`: the shared-memory slot size (max(P_G, P_D) for a replica; shared memory is off
    above SHARED_MAX_NUMEL and a buffer that does not fit goes through gloo)."""
    if world == 1:
        return 0
    if path == "shared" and numel <= capacity <= SHARED_MAX_NUMEL:
        return numel * elem  # written once into this rank's slot
    if path in ("shared", "gloo") and world & (world - 1) == 0 and numel <= EXCHANGE_MAX_NUMEL:
        return exchange_bytes(numel, world, elem)
    return ring_bytes(numel, world, elem)


def replicated_round(p_g: int, p_d: int, n_critic: int, world: int, path: str) -> int:
    """Bytes one replica sends per round: n_critic D all-reduces and one G all-reduce."""
    capacity = max(p_g, p_d)
    return (n_critic * all_reduce_bytes(p_d, world, path, capacity)
            + all_reduce_bytes(p_g, world, path, capacity))


def split_round(p_g: int, n_critic: int, batch: int, sample_numel: int, m: int, k: int,
                path: str) -> dict[str, list[int]]:
    """Bytes each split worker sends per round, by role: {"G": [per generator], "D": [per
    discriminator]}. Generator j's D-phase fakes (n_critic, B/M, *shape) are read by every
    discriminator whose B/K rows overlap its B/M; its G-phase batch (B/M, *shape) by all K;
    its gradients are all-reduced among the M. Discriminator i returns its loss (one float, read
    by all M) and dL/dx for the whole batch (B rows, each part read by its generator)."""
    part = batch // m * sample_numel * FLOAT32
    readers = [sum(j in g_parts_for(i, k, m, batch) for i in range(k)) for j in range(m)]
    g_sent = [n_critic * part * readers[j] + k * part + all_reduce_bytes(p_g, m, path, p_g) for j in range(m)]
    d_sent = [batch * sample_numel * FLOAT32 + m * FLOAT32 for _ in range(k)]
    return {"G": g_sent, "D": d_sent}


def model_sizes(config: Any, sample_shape: tuple[int, ...]) -> tuple[int, int]:
    """(P_G, P_D): the parameters a replica all-reduces (every parameter gets a gradient)."""
    from ganray.models.registry import build_discriminator, build_generator

    model = config.model.model_dump()
    g, d = build_generator(model, sample_shape), build_discriminator(model, sample_shape)
    return sum(p.numel() for p in g.parameters()), sum(p.numel() for p in d.parameters())


# -- counting in real runs ----------------------------------------------------------------------
def _small(**sections: Any) -> Any:
    """The bench's mlp case on a small data set (the payload does not depend on its size), half
    a CPU per worker so that four fit beside the driver on a small machine, and a global batch of
    384 that 1, 2, 3 and 4 workers divide (a replica's payload does not depend on it)."""
    sections["resources"] = {"cpus_per_worker": 0.5, **sections.get("resources", {})}
    return case_config("mlp", data={"size": 8192}, schedule={"batch_size": 384}, **sections)


def count_replicated(world: int, collective: str, rounds: int) -> dict[str, Any]:
    """A real `replicated` run of `rounds` rounds: counted bytes per round per replica."""
    from ganray.orchestrator.job.coordinator import RayEngine

    config = _small(topology={"kind": "replicated", "num_workers": world},
                    resources={"collective": collective})
    engine = RayEngine(config)
    try:
        result = engine.run(rounds)
        allreduce = engine.allreduce
    finally:
        engine.close()
    p_g, p_d = model_sizes(config, (2,))
    path = "shared" if collective == "auto" else "gloo"
    return {"topology": "replicated", "world": world, "collective": collective, "allreduce": allreduce,
            "rounds": result.rounds, "counted": result.comm_bytes // result.rounds,
            "counted_remainder": result.comm_bytes % result.rounds,
            "predicted": replicated_round(p_g, p_d, config.schedule.n_critic, world, path)}


def count_split(m: int, k: int, rounds: int) -> dict[str, Any]:
    """A real `split` run: the generators' counted all-reduce per round, and the sizes of one
    round's fakes, G-phase batches and feedback as the actors return them."""
    import ray

    from ganray.orchestrator.job.coordinator import RayEngine

    config = _small(topology={"kind": "split", "num_generators": m, "num_discriminators": k},
                    resources={"generator": {"cpus": 0.5}, "discriminator": {"cpus": 0.5}})
    engine = RayEngine(config)
    try:
        gens, discs = engine.actors[:m], engine.actors[m:]
        before = ray.get([g.payload_bytes.remote() for g in gens])
        result = engine.run(rounds)
        reduced = [(a - b) // result.rounds for a, b in zip(ray.get([g.payload_bytes.remote() for g in gens]), before)]
        r = result.round_index  # one more round's objects, made as the driver would make them
        fakes = ray.get([g.fakes.remote(r) for g in gens])
        g_out = [g.forward.remote(r) for g in gens]
        feedback = [ray.get(d.feedback.options(num_returns=m + 1).remote(*g_out)) for d in discs]
        g_out_bytes = [_nbytes(x) for x in ray.get(g_out)]
    finally:
        engine.close()
    batch = config.schedule.batch_size
    readers = [sum(j in g_parts_for(i, k, m, batch) for i in range(k)) for j in range(m)]
    counted_g = [_nbytes(fakes[j]) * readers[j] + g_out_bytes[j] * k + reduced[j] for j in range(m)]
    # Every generator reads each discriminator's loss; generator j reads part j of its dL/dx.
    counted_d = [m * _nbytes(fb[0]) + sum(_nbytes(x) for x in fb[1:]) for fb in feedback]
    p_g, _ = model_sizes(config, (2,))
    predicted = split_round(p_g, config.schedule.n_critic, batch, 2, m, k, "shared")
    return {"topology": "split", "generators": m, "discriminators": k, "rounds": result.rounds,
            "counted": {"G": counted_g, "D": counted_d}, "predicted": predicted}


def _nbytes(t: Any) -> int:
    return int(t.numel() * t.element_size())


# -- predictions --------------------------------------------------------------------------------
def predictions(sizes: dict[str, tuple[int, int]], worlds: tuple[int, ...] = (8, 64)) -> list[dict[str, Any]]:
    """Bytes per replica per round for one replica per node (no shared memory across nodes):
    gloo on CPU nodes, nccl's ring on GPU nodes."""
    rows = []
    for case, (p_g, p_d) in sizes.items():
        for world in worlds:
            rows.append({"case": case, "world": world, "P_G": p_g, "P_D": p_d,
                         "gloo": replicated_round(p_g, p_d, 1, world, "gloo"),
                         "ring": replicated_round(p_g, p_d, 1, world, "ring")})
    return rows


def split_predictions(cases: dict[str, tuple[int, int, int]], worlds: tuple[int, ...] = (8, 64)) -> list[dict[str, Any]]:
    """Bytes per round of a split job with one generator and a discriminator on each other node
    (K = nodes - 1), n_critic 1; `cases`: name -> (P_G, batch, elements per sample)."""
    rows = []
    for case, (p_g, batch, sample_numel) in cases.items():
        for world in worlds:
            sent = split_round(p_g, 1, batch, sample_numel, 1, world - 1, "gloo")
            rows.append({"case": case, "world": world, "B": batch, "S": sample_numel,
                         "G": sent["G"][0], "D": sent["D"][0]})
    return rows


def _mib(n: int) -> str:
    return f"{n / 2**20:.3f}"


def markdown(rows: list[dict[str, Any]], splits: list[dict[str, Any]], preds: list[dict[str, Any]],
             split_preds: list[dict[str, Any]]) -> str:
    out = ["| world | collective | path (as logged) | counted B/round/rank | predicted | equal |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['world']} | {r['collective']} | {r['allreduce']} | {r['counted']:,} | {r['predicted']:,} "
                   f"| {'yes' if r['counted'] == r['predicted'] and r['counted_remainder'] == 0 else 'NO'} |")
    out += ["", "| split | role | counted B/round per worker | predicted | equal |", "|---|---|---|---|---|"]
    for s in splits:
        for role in ("G", "D"):
            c, p = s["counted"][role], s["predicted"][role]
            out.append(f"| {s['generators']} G + {s['discriminators']} D | {role} | {', '.join(f'{x:,}' for x in c)} "
                       f"| {', '.join(f'{x:,}' for x in p)} | {'yes' if c == p else 'NO'} |")
    out += ["", "| case | nodes | P_G | P_D | gloo (CPU) MiB/round/rank | ring (nccl) MiB/round/rank |",
            "|---|---|---|---|---|---|"]
    for p in preds:
        out.append(f"| {p['case']} | {p['world']} | {p['P_G']:,} | {p['P_D']:,} | {_mib(p['gloo'])} | {_mib(p['ring'])} |")
    out += ["", "| case | nodes | 1 G + K D | G sends MiB/round | each D sends MiB/round |", "|---|---|---|---|---|"]
    for p in split_preds:
        out.append(f"| {p['case']} | {p['world']} | 1 G + {p['world'] - 1} D | {_mib(p['G'])} | {_mib(p['D'])} |")
    return "\n".join(out)


def main(argv: Optional[list[str]] = None) -> int:
    """Count the payload of real runs at 1, 2, 3 and 4 workers and of three split layouts; write JSON."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args(argv)
    import ray

    owns = not ray.is_initialized()
    if owns:
        ray.init(address="local", num_cpus=6, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        rows = [count_replicated(1, "auto", args.rounds)]
        for world, collective in ((2, "auto"), (2, "gloo"), (3, "auto"), (3, "gloo"), (4, "auto"), (4, "gloo")):
            rows.append(count_replicated(world, collective, args.rounds))
        splits = [count_split(m, k, args.rounds) for m, k in ((1, 1), (1, 2), (2, 2))]
    finally:
        if owns:
            ray.shutdown()
    mlp, dcgan = case_config("mlp"), case_config("dcgan32")
    sizes = {"mlp": model_sizes(mlp, (2,)), "dcgan32": model_sizes(dcgan, (3, 32, 32))}
    preds = predictions(sizes)
    split_preds = split_predictions({"mlp": (sizes["mlp"][0], mlp.schedule.batch_size, 2),
                                     "dcgan32": (sizes["dcgan32"][0], dcgan.schedule.batch_size, 3 * 32 * 32)})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "payload.json").write_text(json.dumps(
        {"command": "python -m ganray.bench.payload", "rounds": args.rounds, "model_sizes": sizes,
         "replicated": rows, "split": splits, "predictions": preds,
         "split_predictions": split_preds}, indent=1) + "\n")
    print(markdown(rows, splits, preds, split_preds))
    return 0 if all(r["counted"] == r["predicted"] and r["counted_remainder"] == 0 for r in rows) \
        and all(s["counted"] == s["predicted"] for s in splits) else 1


if __name__ == "__main__":
    raise SystemExit(main())
