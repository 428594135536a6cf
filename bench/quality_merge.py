"""Seeds of one image-set protocol trained by separate `ganray bench quality` runs, reported as one.

A 10-seed protocol of stacked digits is hours of training on one process; on a machine (or a
cluster) with room for several, each seed can run as its own `ganray bench quality --seeds 1
--first-seed N --out DIR_N`, and this command reports them together:

    python -m ganray.bench.quality_merge --out DIR DIR_1000/quality.json DIR_1001/quality.json ...

The runs must have trained the same recipe the same way (config, `--set` overrides, topology and
total kimg: `TRAINING_KEYS`) on distinct seeds. Evaluations do not change what trains, so runs
probed at different cadences merge: each seed then keeps its run's `probe_kimg`, and the body's
`probe_kimg` lists them (a finer cadence finds the target sooner and has more evaluations to
call the best). The merged quality.json has
the shape the suite writes (the set's body recomputed from the per-seed records by the suite's own
`summarize`; each seed's best evaluation and time to target again from its timeline), plus
`merged_from`: each input's path, date, machine and wall time. quality.md
carries the suite's note for the set. Bad input: one line, exit 2, nothing written.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path
from typing import Any

from ganray.bench.quality import seeds_cell, seed_label
from ganray.bench.quality_images import HEADER_KEYS, IMAGE_SETS, best_of, first_met, image_set_note, summarize
from ganray.models.errors import GanrayError

TRAINING_KEYS = tuple(k for k in HEADER_KEYS if k != "probe_kimg")


def _load(path: Path) -> dict[str, Any]:
    try:
        body = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise GanrayError(f"cannot read {path} as a quality.json ({err}); pass the quality.json files "
                          "that `ganray bench quality --out DIR` wrote") from None
    if not isinstance(body, dict) or body.get("suite") != "quality":
        raise GanrayError(f"{path} is not a quality suite's JSON (no \"suite\": \"quality\"); pass the "
                          "quality.json that `ganray bench quality --out DIR` wrote")
    return body


def merge(paths: list[Path]) -> dict[str, Any]:
    """One quality body holding every image set of the inputs, each over all their seeds."""
    bodies = [(path, _load(path)) for path in paths]
    names = [n for n in IMAGE_SETS if any(n in body for _, body in bodies)]
    if not names:
        raise GanrayError("none of the inputs holds an image set (" + ", ".join(IMAGE_SETS) + "); "
                          "merging covers the image sets of `ganray bench quality` only")
    merged: dict[str, Any] = {}
    for name in names:
        parts = [(path, body[name]) for path, body in bodies if name in body]
        header = {k: parts[0][1][k] for k in HEADER_KEYS}
        for path, part in parts[1:]:
            differs = [k for k in TRAINING_KEYS if part[k] != header[k]]
            if differs:
                raise GanrayError(f"{name} in {path} was trained with another {differs[0]} ({part[differs[0]]!r}, "
                                  f"not {header[differs[0]]!r} as in {parts[0][0]}); "
                                  "merge runs of one recipe and layout")
        cadences = sorted({part["probe_kimg"] for _, part in parts})
        if len(cadences) > 1:
            header["probe_kimg"] = cadences
            parts = [(path, {**part, "seeds": [{**s, "probe_kimg": part["probe_kimg"]} for s in part["seeds"]]})
                     for path, part in parts]
        # Best evaluation and time to target again from each timeline, by the suite's rules of
        # today (an older JSON may have ranked its evaluations otherwise).
        per_seed = sorted(({**s, "best": best_of(s["timeline"], IMAGE_SETS[name]),
                            "time_to_target_s": first_met(s["timeline"], IMAGE_SETS[name])}
                           for _, part in parts for s in part["seeds"]), key=lambda s: s["seed"])
        seeds = [s["seed"] for s in per_seed]
        repeated = sorted({s for s in seeds if seeds.count(s) > 1})
        if repeated:
            raise GanrayError(f"seed {repeated[0]} of {name} appears in more than one input; merge distinct seeds")
        merged[name] = summarize(name, header, per_seed)
    all_seeds = sorted({s["seed"] for name in names for s in merged[name]["seeds"]})
    return {"suite": "quality", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "merged_from": [{"path": str(path), "date": body.get("date"), "machine": body.get("machine"),
                             "wall_s": body.get("wall_s"), "seeds": body.get("seeds")} for path, body in bodies],
            "quick": any(body.get("quick") for _, body in bodies),
            "seeds": all_seeds, "held_out": all_seeds[0] >= 100, **merged}


def notes(body: dict[str, Any]) -> str:
    """The suite's note line per image set of a merged body."""
    return "\n".join(image_set_note(name, body[name], seed_label([s["seed"] for s in body[name]["seeds"]]), seeds_cell)
                     for name in IMAGE_SETS if name in body)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the merged quality.json and quality.md")
    parser.add_argument("inputs", type=Path, nargs="+", help="quality.json files of `ganray bench quality` runs")
    args = parser.parse_args(argv)
    try:
        body = merge(args.inputs)
    except GanrayError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quality.json").write_text(json.dumps(body, indent=2, allow_nan=False))
    text = notes(body)
    (args.out / "quality.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
