"""`compare.md`: the two tables of `compare.json` as Markdown, so docs quote measured figures
as written, never retyped."""

from __future__ import annotations

from typing import Any, Optional

# The figures shown first, in this order, when the data has them; any other metric follows.
_LEAD = ("modes", "hq", "kl", "fid", "kid", "classes", "class_kl", "confidence")
_SKIP = ("kid_std", "fid_floor", "kid_floor", "classifier_acc")


def _figure(mean: Optional[float], std: Optional[float], seeds: int, digits: int = 3) -> str:
    if mean is None:
        return "n/a"
    text = f"{mean:.{digits}g}"
    return text + (f" ± {std:.2g}" if seeds > 1 and std is not None else "")


def _metric_names(summary: dict[str, Any], table: str) -> list[str]:
    names: list[str] = []
    for entry in summary["learners"].values():
        source = entry if table == "time" else (entry.get("same_images") or {})
        for key in source.get("metrics", {}):
            if key not in names and key not in _SKIP:
                names.append(key)
    return [k for k in _LEAD if k in names] + [k for k in names if k not in _LEAD]


def markdown_tables(summary: dict[str, Any]) -> str:
    seeds = len(summary["seeds"])
    lines = []
    names = _metric_names(summary, "time")
    budget = summary["budget"]
    spent = ", ".join(f"{s:.1f}" for s in budget["per_seed_s"] if s is not None)
    how = "the GAN's time for schedule.total_kimg" if budget["kind"] == "gan_total_kimg" else "given"
    lines.append(f"Same wall-clock budget ({how}: {spent} s; seeds {', '.join(map(str, summary['seeds']))}"
                 + (", mean ± std" if seeds > 1 else "") + ")")
    lines.append("")
    lines.append("| learner | " + " | ".join(names) + " | train s | kimg seen | s per 1,000 samples | evaluations per sample |")
    lines.append("|" + "---|" * (len(names) + 5))
    for name, e in summary["learners"].items():
        cells = [_figure(e["metrics"].get(k), e["metrics_std"].get(k), seeds) for k in names]
        kimg = None if e["images_seen"] is None else e["images_seen"] / 1000
        kimg_std = None if e.get("images_seen_std") is None else e["images_seen_std"] / 1000
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {_figure(e['train_s'], e.get('train_s_std'), seeds)}"
                     f" | {_figure(kimg, kimg_std, seeds, 4)}"
                     f" | {_figure(e['sample_s_per_1000'], e.get('sample_s_per_1000_std'), seeds)}"
                     f" | {_figure(e['evals_per_sample'], None, 1)} |")
    names = _metric_names(summary, "images")
    if names:
        points = ", ".join(f"{p / 1000:g}" for p in summary["same_images"]["per_seed"] if p is not None)
        lines += ["", f"Same number of real images seen ({points} kimg: every learner reached it within its budget)", ""]
        lines.append("| learner | " + " | ".join(names) + " | kimg seen |")
        lines.append("|" + "---|" * (len(names) + 2))
        for name, e in summary["learners"].items():
            same = e.get("same_images")
            if not same:
                continue
            cells = [_figure(same["metrics"].get(k), same["metrics_std"].get(k), seeds) for k in names]
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {_figure(same['images_seen'] / 1000, None, 1, 4)} |")
    return "\n".join(lines) + "\n"
