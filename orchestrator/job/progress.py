"""The console progress bar of `ganray train`: kimg, rounds/s, losses, ETA (on stderr).

stdout stays machine-readable (`run_id=...`, `key=value` lines); the bar goes to stderr and is
replaced by one plain line per update when stderr is not a terminal (CI logs, `ray job` logs).
"""

from __future__ import annotations

import sys
import time
from typing import Any, Optional

from rich.console import Console
from rich.progress import BarColumn, Progress as RichProgress, TextColumn, TimeRemainingColumn


class Progress:
    def __init__(self, total_kimg: float, enabled: bool = True, min_interval_s: float = 5.0) -> None:
        self.total = total_kimg
        self.enabled = enabled
        self.console = Console(file=sys.stderr)
        self.interactive = enabled and self.console.is_terminal
        self.min_interval_s = min_interval_s
        self._last_print = 0.0
        self._bar: Optional[RichProgress] = None
        self._task: Any = None
        self._eval = ""

    def start(self, kimg: float) -> None:
        if not self.enabled:
            return
        if self.interactive:
            self._bar = RichProgress(TextColumn("[bold]train"), BarColumn(),
                                     TextColumn("{task.completed:.1f}/{task.total:.0f} kimg"),
                                     TextColumn("{task.fields[info]}"), TimeRemainingColumn(),
                                     console=self.console, transient=False)
            self._bar.start()
            self._task = self._bar.add_task("train", total=self.total, completed=kimg, info="")

    def update(self, kimg: float, rounds_per_s: float, metrics: dict[str, list[float]]) -> None:
        if not self.enabled:
            return
        mean = {k: sum(v) / len(v) for k, v in metrics.items() if v}
        if "loss/G" in mean:  # the GAN
            losses = (f"loss D {mean.get('loss/D', float('nan')):.3f}"
                      f"  G {mean['loss/G']:.3f}")
        else:  # another learner (the energy model has a D but no G): its own losses and D's scores
            losses = "  ".join(f"{k.replace('/', ' ')} {v:.3f}" for k, v in mean.items()
                               if k.startswith(("loss/", "D/")))
        info = f"{rounds_per_s:6.1f} rounds/s  {losses}{self._eval}"
        if self._bar is not None:
            self._bar.update(self._task, completed=kimg, info=info)
            return
        now = time.monotonic()
        if now - self._last_print >= self.min_interval_s or kimg >= self.total:
            self._last_print = now
            print(f"[ganray] {kimg:8.1f}/{self.total:.0f} kimg  {info}", file=sys.stderr, flush=True)

    def note_eval(self, scores: dict[str, float]) -> None:
        if scores:
            self._eval = "  " + " ".join(f"{k}={v:.3g}" for k, v in scores.items() if not k.endswith("_floor"))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
