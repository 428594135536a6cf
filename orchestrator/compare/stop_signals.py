"""Ctrl-C (SIGINT) and SIGTERM end a comparison the same way: cleanly, with no traceback.

While a learner trains, the Trainer owns SIGTERM (it finishes the chunk, writes a checkpoint and
returns without its final evaluation); SIGINT is handed to that same handler, so Ctrl-C stops the
learner in training after its checkpoint instead of raising `KeyboardInterrupt` in the middle of a
round (which left the child run, the Ray workers and the parent run to be torn down by exception
handlers, slowly, with a traceback). Between learners (start-up, scoring, drawing) either signal
raises `KeyboardInterrupt` at once: the one exception Ray's blocking calls pass through intact (a
signal handler raising anything else inside `ray.get` comes out as a `SystemError`); the runner
turns it into `CompareStopped`, closes the parent run as KILLED, and the CLI exits with 128 + the
signal's number (130 for SIGINT, 143 for SIGTERM).
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any, Callable, Optional

from ganray.models.errors import GanrayError


class CompareStopped(GanrayError):
    """The comparison was asked to stop (SIGINT or SIGTERM)."""

    exit_code = 128 + signal.SIGTERM

    def __init__(self, message: str, signum: int = signal.SIGTERM) -> None:
        super().__init__(message)
        self.exit_code = 128 + int(signum)


class StopSignals:
    """Installs the comparison's SIGINT and SIGTERM handlers for the `with` block; remembers the signal."""

    def __init__(self) -> None:
        self.received: Optional[int] = None
        self._previous: dict[int, Any] = {}

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else "SIGTERM"

    def stopped(self, what: str) -> CompareStopped:
        return CompareStopped(f"stopped ({self.name}) {what}", self.received or signal.SIGTERM)

    def __enter__(self) -> "StopSignals":
        # Python runs signal handlers in the main thread only (tests call the runner from it too).
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.getsignal(signum)
                signal.signal(signum, self._on_signal)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _on_signal(self, signum: int, frame: Optional[FrameType]) -> None:
        if self.received is None:
            self.received = signum
        training = self._training_handler()
        if training is not None:  # a Trainer holds SIGTERM: let it checkpoint and return
            training(signal.SIGTERM, frame)
            return
        raise KeyboardInterrupt

    def _training_handler(self) -> Optional[Callable[[int, Optional[FrameType]], Any]]:
        """The SIGTERM handler a running Trainer installed over ours, if one is installed now."""
        current = signal.getsignal(signal.SIGTERM)
        if callable(current) and current != self._on_signal:
            return current
        return None
