"""The MLflow run logger: one run, one background writer thread, never a blocked training loop.

The coordinator logs through `RunLogger`, which queues every call (metrics, tags, params,
artifacts) for one background thread per run: the training loop never waits on the network, an
unreachable server only delays delivery (retries with backoff, points buffered up to a bound,
oldest dropped first and counted), and the order of everything queued is kept. `MlflowClient` is
used throughout, never the fluent API, so several loggers (Tune trials) can live in one process
without sharing global run state. Store resolution, run tags and the param/tag clean-up live in
`ganray.orchestrator.tracking.store`.
"""

from __future__ import annotations

import collections
import contextlib
import io
import logging
import os
import random
import sys
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from ganray.orchestrator.errors import TrackingError
from ganray.orchestrator.tracking.mlflow_batches import (METRICS_PER_BATCH, PARAMS_PER_BATCH, Abandoned, MetricRun,
                                                         Permanent, QueuedCall, is_transient, param_entities,
                                                         remove_tree, tag_entities)
from ganray.orchestrator.tracking.store import _first_line, _tag_value, param_value, redact, scrub

if TYPE_CHECKING:  # MLflow costs seconds to import; only the functions that talk to it import it.
    from mlflow import MlflowClient

log = logging.getLogger("ganray.tracking")


class RunLogger:
    """One MLflow run, written by one background thread; no call here blocks on the network."""

    def __init__(self, uri: str, experiment_id: str, run_id: str | None = None, run_name: str | None = None,
                 tags: dict | None = None, buffer_size: int = 100_000, *, max_backoff_s: float = 10.0,
                 warn_every: int = 10, stall_warn_s: float = 30.0) -> None:
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        self._uri = uri
        self._client = MlflowClient(uri)
        self.buffer_size = max(1, int(buffer_size))
        self.max_backoff_s = max_backoff_s
        self.warn_every = max(1, warn_every)
        self.stall_warn_s = stall_warn_s
        self._existing_params: dict[str, str] = {}
        scrubbed = {str(k): _tag_value(v) for k, v in (tags or {}).items()}
        try:
            if run_id is None:
                run = self._client.create_run(experiment_id, run_name=run_name, tags=scrubbed)
            else:
                run = self._client.get_run(run_id)
                if run.info.lifecycle_stage == "deleted":
                    raise TrackingError(f"run {run_id} is deleted in {redact(uri)}; restore it or start a new run")
                self._existing_params = dict(run.data.params)
                if run.info.status != "RUNNING":  # a finished run accepts no data until reopened
                    self._client.update_run(run_id, status="RUNNING")
                if scrubbed:
                    self._client.log_batch(run_id, tags=tag_entities(scrubbed))
        except MlflowException as exc:
            what = f"run {run_id}" if run_id else f"a run in experiment {experiment_id}"
            raise TrackingError(f"cannot open {what} in {redact(uri)} ({_first_line(exc)})") from None
        self._run_id: str = run.info.run_id
        self._experiment_id: str = run.info.experiment_id

        self._cond = threading.Condition()
        self._ops: collections.deque[MetricRun | QueuedCall] = collections.deque()
        self._queued_points = 0
        self._busy = False  # the sender holds an op (sending or backing off)
        self._inflight_since: float | None = None
        self._closing = False
        self._abandon = False  # close() timed out: stop retrying, drop what is left
        self._closed = False
        self._skip_upto: int | None = None
        self.dropped = 0  # metric points dropped because the buffer was full
        self.rejected = 0  # points or calls the store refused for good
        self.sent_points = 0
        self._next_drop_warn = 1
        self._failures = 0  # consecutive failed sends
        self._outage_start: float | None = None
        self._stall_warned = False
        self._wake = threading.Event()  # interrupts a backoff sleep at close
        self._thread = threading.Thread(target=self._run, name=f"ganray-mlflow-{self._run_id[:8]}", daemon=True)
        self._thread.start()

    # -- properties ----------------------------------------------------------------------------

    @property
    def run_id(self) -> str:
        return self._run_id

    @property
    def experiment_id(self) -> str:
        return self._experiment_id

    @property
    def client(self) -> "MlflowClient":
        return self._client

    @property
    def uri(self) -> str:
        """The tracking URI as given (may carry credentials: never print it; use `redact`)."""
        return self._uri

    @property
    def pending(self) -> int:
        """Metric points queued and not yet sent."""
        with self._cond:
            return self._queued_points

    # -- logging calls (all non-blocking) --------------------------------------------------------

    def log_params(self, params: dict) -> None:
        """Params as text (500 chars at most), sent in batches of 100.

        On a resumed run MLflow refuses to change a param; a value that changed (allowed keys such
        as schedule.total_kimg) is kept as the tag `ganray.resumed.<key>` instead.
        """
        fresh: dict[str, str] = {}
        changed: dict[str, str] = {}
        for key, value in params.items():
            text = param_value(value)
            old = self._existing_params.get(str(key))
            if old is None:
                fresh[str(key)] = text
            elif old != text:
                changed[f"ganray.resumed.{key}"] = text
        items = list(fresh.items())
        for start in range(0, len(items), PARAMS_PER_BATCH):
            chunk = dict(items[start:start + PARAMS_PER_BATCH])
            self._existing_params.update(chunk)
            self._submit(QueuedCall(lambda c, r, p=chunk: c.log_batch(r, params=param_entities(p)),
                               f"{len(chunk)} params"))
        if changed:
            self.set_tags(changed)

    def set_tags(self, tags: dict) -> None:
        items = [(str(k), _tag_value(v)) for k, v in tags.items()]
        for start in range(0, len(items), PARAMS_PER_BATCH):
            chunk = dict(items[start:start + PARAMS_PER_BATCH])
            self._submit(QueuedCall(lambda c, r, t=chunk: c.log_batch(r, tags=tag_entities(t)), f"{len(chunk)} tags"))

    def skip_steps_upto(self, step: int | None) -> None:
        """Drop metric points at or below `step` (resume: those are already in the store)."""
        self._skip_upto = None if step is None else int(step)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Queue `metrics` at `step` (timestamped now) and return at once."""
        step = int(step)
        if self._closing or (self._skip_upto is not None and step <= self._skip_upto):
            return
        now_ms = int(time.time() * 1000)
        points = [(str(k), float(v), now_ms, step) for k, v in metrics.items()]
        if not points:
            return
        drop_warning = None
        with self._cond:
            tail = self._ops[-1] if self._ops else None
            if not isinstance(tail, MetricRun):
                tail = MetricRun()
                self._ops.append(tail)
            tail.points.extend(points)
            self._queued_points += len(points)
            if self._queued_points > self.buffer_size:
                drop_warning = self._drop_oldest(self._queued_points - self.buffer_size)
            self._cond.notify_all()
            stalled = (self._inflight_since is not None and not self._stall_warned
                       and time.monotonic() - self._inflight_since > self.stall_warn_s)
            if stalled:
                self._stall_warned = True
        if drop_warning:
            log.warning(drop_warning)
        if stalled:
            log.warning("MLflow at %s has not answered for %.0f s; metrics are buffered (%d points) and "
                        "training continues", redact(self._uri), self.stall_warn_s, self.pending)

    def log_artifact(self, local_path: str | os.PathLike, artifact_path: str | None = None) -> Future:
        """Upload a file (keep it in place until the returned future is done)."""
        path = str(local_path)
        return self._submit(QueuedCall(lambda c, r: c.log_artifact(r, path, artifact_path), f"artifact {path}"))

    def log_artifacts(self, local_dir: str | os.PathLike, artifact_path: str | None = None) -> Future:
        path = str(local_dir)
        return self._submit(QueuedCall(lambda c, r: c.log_artifacts(r, path, artifact_path), f"artifacts {path}"))

    def log_text(self, text: str, artifact_file: str) -> Future:
        """A text artifact, scrubbed of credentials (a config's tracking.uri may carry a password)."""
        text = scrub(text)
        return self._submit(QueuedCall(lambda c, r: c.log_text(r, text, artifact_file), f"text {artifact_file}"))

    def log_figure(self, fig: Any, artifact_file: str) -> Future:
        """A matplotlib figure is rendered now (the caller may reuse or close it), uploaded later."""
        if not hasattr(fig, "savefig"):
            return self._submit(QueuedCall(lambda c, r: c.log_figure(r, fig, artifact_file), f"figure {artifact_file}"))
        import tempfile

        tmp = Path(tempfile.mkdtemp(prefix="ganray-fig-"))
        local = tmp / Path(artifact_file).name
        fig.savefig(local)
        folder = str(Path(artifact_file).parent)
        folder_arg = None if folder in ("", ".") else folder
        return self._submit(QueuedCall(lambda c, r: c.log_artifact(r, str(local), folder_arg), f"figure {artifact_file}",
                                  cleanup=lambda: remove_tree(tmp)))

    def log_image(self, image_array: Any, key: str, step: int) -> Future:
        """A time-stepped image (MLflow's image charts); the array is copied now."""
        import numpy as np

        image = np.array(image_array, copy=True)
        ts = int(time.time() * 1000)
        return self._submit(QueuedCall(
            lambda c, r: c.log_image(r, image, key=key, step=int(step), timestamp=ts, synchronous=True),
            f"image {key}@{step}"))

    # -- reading -------------------------------------------------------------------------------

    def max_logged_step(self, metric_key: str) -> int | None:
        """The highest step stored for `metric_key` in this run (None when it has no points)."""
        from mlflow.exceptions import MlflowException

        try:
            history = self._client.get_metric_history(self._run_id, metric_key)
        except MlflowException as exc:
            raise TrackingError(f"cannot read metric '{metric_key}' of run {self._run_id} from "
                                f"{redact(self._uri)} ({_first_line(exc)})") from None
        return max((m.step for m in history), default=None)

    # -- completion ----------------------------------------------------------------------------

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything queued so far is sent (or given up); False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._ops or self._busy:
                if not self._thread.is_alive():
                    return False
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(timeout=remaining if remaining is not None else 1.0)
        return True

    def close(self, status: str = "FINISHED", timeout: float | None = 300.0) -> bool:
        """Flush, then mark the run `status` (FINISHED, FAILED, KILLED). True when all was delivered.

        The terminate call is queued behind the data so it is retried like the rest. After
        `timeout` seconds what is left is dropped with a warning: a dead server must not keep
        the process from exiting.
        """
        if self._closed:
            return True
        status = status.upper()

        def terminate(client: "MlflowClient", run_id: str) -> None:
            # MLflow prints the run's URL here, credentials included when the URI has them.
            buffer = io.StringIO()
            with contextlib.redirect_stdout(buffer):
                client.set_terminated(run_id, status=status)
            if buffer.getvalue():
                sys.stdout.write(redact(buffer.getvalue()))

        done = self._submit(QueuedCall(terminate, f"terminate run as {status}"))
        with self._cond:
            self._closing = True
        complete = self.flush(timeout) and done.done() and done.result() is True
        with self._cond:
            self._abandon = True
            left = self._queued_points
            self._cond.notify_all()
        self._wake.set()
        self._thread.join(timeout=5.0)
        self._closed = True
        if self.dropped:
            log.warning("MLflow run %s: %d metric points were dropped while the buffer (%d) was full",
                        self._run_id, self.dropped, self.buffer_size)
        if not complete:
            log.warning("MLflow run %s at %s: gave up after %s s with %d metric points unsent; the run may "
                        "still show as RUNNING", self._run_id, redact(self._uri), timeout, left)
        return complete

    # -- internals -----------------------------------------------------------------------------

    def _submit(self, call: QueuedCall) -> Future:
        with self._cond:
            if self._closing:
                call.future.set_result(False)
                return call.future
            self._ops.append(call)
            self._cond.notify_all()
        return call.future

    def _drop_oldest(self, n: int) -> str | None:
        """Drop `n` queued points, oldest first (caller holds the lock)."""
        dropped = 0
        for op in self._ops:
            if dropped >= n:
                break
            if isinstance(op, MetricRun):
                while op.points and dropped < n:
                    op.points.popleft()
                    dropped += 1
        self._queued_points -= dropped
        self.dropped += dropped
        if self.dropped >= self._next_drop_warn:  # warn at 1, 10, 100, ... dropped points
            while self._next_drop_warn <= self.dropped:
                self._next_drop_warn *= 10
            return (f"MLflow at {redact(self._uri)} is behind: metric buffer full ({self.buffer_size} points), "
                    f"dropping the oldest ({self.dropped} dropped so far)")
        return None

    def _take(self) -> MetricRun | QueuedCall | None:
        """The next unit of work: up to 1000 metric points, or one call (caller holds the lock)."""
        while self._ops:
            head = self._ops[0]
            if isinstance(head, QueuedCall):
                return self._ops.popleft()
            if not head.points:
                self._ops.popleft()
                continue
            batch = MetricRun()
            while head.points and len(batch.points) < METRICS_PER_BATCH:
                batch.points.append(head.points.popleft())
            self._queued_points -= len(batch.points)
            if not head.points:
                self._ops.popleft()
            return batch
        return None

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._ops and not self._abandon:
                    if self._closing:
                        break
                    self._cond.wait()
                if self._abandon or not self._ops:
                    self._fail_remaining()
                    return
                op = self._take()
                self._busy = op is not None
            if op is not None:
                try:
                    ok = self._deliver(op)
                except BaseException:  # noqa: BLE001 - the sender must survive anything
                    log.exception("ganray MLflow sender: unexpected error")
                    ok = False
                if isinstance(op, QueuedCall):
                    if op.cleanup:
                        op.cleanup()
                    if not op.future.done():
                        op.future.set_result(ok)
            with self._cond:
                self._busy = False
                self._inflight_since = None
                self._cond.notify_all()

    def _fail_remaining(self) -> None:
        for op in self._ops:
            if isinstance(op, QueuedCall):
                if op.cleanup:
                    op.cleanup()
                if not op.future.done():
                    op.future.set_result(False)
        self._ops.clear()

    def _deliver(self, op: MetricRun | QueuedCall) -> bool:
        if isinstance(op, QueuedCall):
            try:
                self._retrying(lambda: op.fn(self._client, self._run_id))
                return True
            except Permanent as exc:
                self.rejected += 1
                log.warning("MLflow refused %s for run %s: %s", op.what, self._run_id, exc)
                return False
            except Abandoned:
                return False
        try:
            return self._send_points(list(op.points))
        except Abandoned:
            return False

    def _send_points(self, points: list[tuple[str, float, int, int]]) -> bool:
        from mlflow.entities import Metric

        metrics = [Metric(key, value, ts, step) for key, value, ts, step in points]
        try:
            self._retrying(lambda: self._client.log_batch(self._run_id, metrics=metrics))
            self.sent_points += len(points)
            return True
        except Permanent as exc:
            if len(points) == 1:  # one bad point must not take its neighbours with it
                self.rejected += 1
                log.warning("MLflow refused metric '%s' at step %d: %s", points[0][0], points[0][3], exc)
                return False
            half = len(points) // 2
            first = self._send_points(points[:half])
            return self._send_points(points[half:]) and first

    def _retrying(self, send: Callable[[], None]) -> None:
        """Run `send` until it succeeds; transient errors back off, permanent ones raise Permanent."""
        attempt = 0
        while True:
            if self._abandon:
                raise Abandoned()
            with self._cond:
                self._inflight_since = time.monotonic()
            try:
                send()
            except Exception as exc:  # noqa: BLE001 - classified below; nothing reaches the caller
                if not is_transient(exc):
                    raise Permanent(_first_line(exc)) from None
                self._on_failure(exc)
                delay = min(self.max_backoff_s, 0.25 * (2 ** min(attempt, 10))) * (0.75 + 0.5 * random.random())
                attempt += 1
                self._wake.wait(delay)
                continue
            self._on_success()
            return

    def _on_failure(self, exc: BaseException) -> None:
        self._failures += 1
        if self._failures == 1:
            self._outage_start = time.monotonic()
        if self._failures == 1 or self._failures % self.warn_every == 0:
            log.warning("MLflow at %s unreachable (%d failed sends, %d metric points buffered): %s; retrying, "
                        "training continues", redact(self._uri), self._failures, self.pending, _first_line(exc))

    def _on_success(self) -> None:
        if self._failures:
            away = time.monotonic() - (self._outage_start or time.monotonic())
            log.warning("MLflow at %s reachable again after %.1f s (%d failed sends); sending buffered data",
                        redact(self._uri), away, self._failures)
        self._failures = 0
        self._outage_start = None
        self._stall_warned = False
