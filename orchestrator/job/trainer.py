"""The training loop: chunks of rounds, metric logging, evaluation, checkpoints, resume, faults.

The loop is the same for every topology; only the engine differs (`engine.make_engine`). The
coordinator process is the one MLflow writer of the job. Metric steps are images seen so far
(global, counting the real images the discriminators consume), one point per sync interval
holding the mean over its rounds. Sync intervals are absolute (every `sync_kimg` worth of rounds
from round 0), so a resumed run logs the very points an uninterrupted one would.

Chunks (one engine call each) end at sync boundaries, at `fault.snapshot_rounds` boundaries and
within a quarter of `fault.grace_s`; chunking never changes results, only how often the driver
looks up. Fault handling (see `fault.py`): a snapshot of the job state every `snapshot_rounds`
rounds; `fault.max_nonfinite` skipped rounds in a row roll back to it with lower learning rates;
a lost or hung worker is recreated and every worker restored from it; SIGTERM finishes the chunk,
writes a checkpoint and exits within `fault.grace_s`.
"""

from __future__ import annotations

import logging
import math
import signal
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from ganray.models.errors import CheckpointError, ConfigError, GanrayError
from ganray.orchestrator.job.config import TrainConfig, config_differences, load_config
from ganray.orchestrator.job.engine import ChunkResult, Engine, build_eval_generator, make_engine
from ganray.orchestrator.job.evaluate import Evaluator
from ganray.orchestrator.job.fault import (ChunkClock, FaultError, FaultPolicy, SnapshotKeeper, SnapshotLostError, brief,
                                       is_worker_loss, plan_chunk, recover_workers, roll_back)
from ganray.orchestrator.job.progress import Progress
from ganray.orchestrator.tracking.system_metrics import SystemMetrics

log = logging.getLogger("ganray")

_FINAL_UPLOAD_TIMEOUT_S = 300.0

METRIC_NAMES = {"loss_D": "loss/D", "loss_G": "loss/G", "real_score": "D/real_score",
                "fake_score": "D/fake_score", "grad_norm_D": "grad_norm/D", "grad_norm_G": "grad_norm/G"}


@dataclass
class TrainResult:
    run_id: Optional[str]
    images_seen: int
    rounds: int
    history: dict[str, list[float]] = field(default_factory=dict)   # per-round metrics
    eval: dict[str, float] = field(default_factory=dict)
    wall_s: float = 0.0
    stopped_early: bool = False
    model_version: Optional[str] = None


class _Interval:
    """Fires each time images_seen crosses a multiple of `every_kimg`."""

    def __init__(self, every_kimg: float, images_seen: int) -> None:
        self.every = max(1, int(round(every_kimg * 1000)))
        self.next = (images_seen // self.every + 1) * self.every

    def due(self, images_seen: int) -> bool:
        if images_seen >= self.next:
            self.next = (images_seen // self.every + 1) * self.every
            return True
        return False


@dataclass
class _LoopState:
    """Where the loop stands: progress, per-round history, and the metric window of the next point."""

    images_seen: int
    rounds: int
    start_round: int
    history: dict[str, list[float]] = field(default_factory=dict)
    window: dict[str, list[float]] = field(default_factory=dict)
    window_rounds: int = 0   # rounds in `window` (the last ones before `rounds`)
    exec_rounds: int = 0     # rounds executed since the last point, redone ones included (throughput)
    dt: float = 0.0
    compute_s: float = 0.0
    comm_s: float = 0.0
    wait_s: float = 0.0
    last_logged_step: int = -1

    def absorb(self, res: ChunkResult, dt: float) -> None:
        for key, values in res.metrics.items():
            self.history.setdefault(key, []).extend(values)
            self.window.setdefault(key, []).extend(values)
        self.window_rounds += res.rounds
        self.exec_rounds += res.rounds
        self.dt += dt
        self.compute_s += res.time_compute_s
        self.comm_s += res.time_comm_s
        self.wait_s += res.time_wait_s or max(0.0, dt - res.time_compute_s - res.time_comm_s)
        self.images_seen, self.rounds = res.images_seen, res.round_index

    def rewind(self, round_index: int, images_seen: int) -> None:
        """Back to `round_index` (a restored snapshot): later rounds' records are dropped."""
        keep = max(0, round_index - self.start_round)
        for values in self.history.values():
            del values[keep:]
        keep_window = max(0, round_index - (self.rounds - self.window_rounds))
        for values in self.window.values():
            del values[keep_window:]
        self.window_rounds = keep_window
        self.rounds, self.images_seen = round_index, images_seen

    def take_window(self) -> dict[str, Any]:
        out = {"metrics": self.window, "rounds": self.window_rounds, "exec_rounds": self.exec_rounds, "dt": self.dt,
               "compute_s": self.compute_s, "comm_s": self.comm_s, "wait_s": self.wait_s}
        self.window, self.window_rounds, self.exec_rounds = {}, 0, 0
        self.dt = self.compute_s = self.comm_s = self.wait_s = 0.0
        return out


EvalHook = Callable[[int, dict[str, float]], None]


class Trainer:
    """Runs one job: owns the engine, the MLflow run (through `RunLogger`) and the schedule.

    For `replicated` and `split` the constructor already starts Ray and the worker actors (while
    a helper thread opens the MLflow run), so start-up errors such as an unplaceable job are
    raised here; `run()` trains and always closes the engine, so call it once constructed.

    Hooks (both optional):
    - `on_run_id(run_id)`: once, as soon as the MLflow run exists (before training starts; from
      the helper thread for the Ray topologies).
    - `on_eval(images_seen, scores)`: after each evaluation, the periodic ones (every
      `eval.every_kimg`) and the final one (which may share its `images_seen` with the last
      periodic one), with the scores as logged (`{"modes": ..., "kl": ...}` without the `eval/`
      prefix; a copy, free to keep). It is called whether or not tracking is enabled, after the
      scores are queued for MLflow. After SIGTERM there is no final evaluation, so no final call.
      An exception it raises fails the run like any training error.
    """

    def __init__(self, config: TrainConfig, tracking_uri: Optional[str] = None,
                 resume: Optional[str] = None, stop_at_kimg: Optional[float] = None,
                 progress: bool = True, on_run_id: Optional[Callable[[str], None]] = None,
                 engine_factory: Callable[[TrainConfig], Engine] = make_engine,
                 on_eval: Optional[EvalHook] = None) -> None:
        self.config = config
        self.on_eval = on_eval
        self.stop_at_kimg = stop_at_kimg
        self.resume = resume
        self.progress_enabled = progress
        self.engine_factory = engine_factory
        self.logger = None
        self.checkpoints = None
        self.run_id: Optional[str] = None
        self.faults: Optional[FaultPolicy] = None
        self.keeper = SnapshotKeeper(config.fault.snapshot_rounds)
        self._stop_requested = threading.Event()
        self._sigterm_at: Optional[float] = None
        self._resume_status = "KILLED"
        self._progressed = False
        self._last_ckpt_images = -1
        self._system: Optional[SystemMetrics] = None
        self._engine: Optional[Engine] = None
        self._t_engine_start = time.perf_counter()  # wall_s counts from the engine's start
        if config.topology.kind == "local":
            self._prepare_tracking(tracking_uri, resume, on_run_id)
        else:
            self._start_with_ray(tracking_uri, resume, on_run_id)

    # -- start-up --------------------------------------------------------------------------
    def _start_with_ray(self, tracking_uri: Optional[str], resume: Optional[str],
                        on_run_id: Optional[Callable[[str], None]]) -> None:
        """Open the MLflow run in a helper thread while this thread starts Ray and the workers.

        Starting Ray and the worker actors takes seconds spent mostly in other processes (GCS,
        raylet, the workers importing torch), so importing mlflow and opening the store fit in
        that time. Ray stays in the calling (main) thread, where it installs its handlers and
        shuts down cleanly. `local` builds its models in this process with torch's global RNG,
        so it does not take this path.
        """
        failure: list[BaseException] = []

        def prepare() -> None:
            try:
                self._prepare_tracking(tracking_uri, resume, on_run_id)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the calling thread
                failure.append(exc)

        helper = threading.Thread(target=prepare, name="ganray-tracking-start", daemon=True)
        helper.start()
        try:
            self._engine = self.engine_factory(self.config)
        except BaseException:
            helper.join()
            if not failure:
                self._abort()  # the run exists: close it as a run that failed to start
            raise
        helper.join()
        if failure:
            self._engine.close()
            self._engine = None
            raise failure[0]

    def _prepare_tracking(self, tracking_uri: Optional[str], resume: Optional[str],
                          on_run_id: Optional[Callable[[str], None]]) -> None:
        config = self.config
        if config.tracking.enabled:
            from ganray.orchestrator.tracking import store as tracking
            from ganray.orchestrator.tracking.run_logger import RunLogger

            self.tracking_uri = tracking.resolve_tracking_uri(tracking_uri, config.tracking.uri)
            experiment_id = tracking.prepare_store(self.tracking_uri, config.tracking.experiment)
            if resume:
                self._check_resume_config(tracking, resume)
            self.logger = RunLogger(self.tracking_uri, experiment_id, run_id=resume,
                                    run_name=config.tracking.run_name,
                                    tags=tracking.run_tags(config),
                                    buffer_size=config.tracking.buffer_size)
            self.run_id = self.logger.run_id
            if on_run_id is not None:
                on_run_id(self.run_id)

    # -- resume ----------------------------------------------------------------------------
    def _check_resume_config(self, tracking: Any, run_id: str) -> None:
        from mlflow import MlflowClient

        client = MlflowClient(self.tracking_uri)
        try:
            run = client.get_run(run_id)
        except Exception:
            raise CheckpointError(f"--resume {run_id}: no such run in {tracking.redact(self.tracking_uri)}; "
                                  "pass a run id printed by an earlier `ganray train`") from None
        if run.info.status in ("FINISHED", "FAILED", "KILLED"):
            self._resume_status = run.info.status  # put back if this resume fails before training
        with tempfile.TemporaryDirectory() as tmp:
            try:
                path = client.download_artifacts(run_id, "config.yaml", tmp)
            except Exception:
                raise CheckpointError(f"--resume {run_id}: the run has no config.yaml artifact; "
                                      "it was not made by ganray train") from None
            old = load_config(path)
        diff = config_differences(old, self.config)
        if diff:
            raise ConfigError(f"--resume {run_id} refuses a changed config: {', '.join(diff)} differ "
                              "from the run's; resume with the run's config (only schedule.total_kimg "
                              "and logging intervals may change)")

    def _fetch_resume_checkpoint(self) -> tuple[dict[str, Any], dict]:
        """The run's latest complete checkpoint, digest-checked, before any worker is started."""
        from ganray.orchestrator.job.checkpoint import latest_checkpoint

        assert self.logger is not None and self.resume
        with tempfile.TemporaryDirectory() as tmp:
            found = latest_checkpoint(self.logger.client, self.resume, Path(tmp))
        if found is None:
            raise CheckpointError(f"--resume {self.resume}: the run has no complete checkpoint; "
                                  "start a new run instead")
        state, meta = found
        if meta.get("config_hash") not in (None, self.config.config_hash(ignore=_RESUME_IGNORE)):
            raise CheckpointError("the checkpoint was written with another config; resume with the run's config")
        return state, meta

    def _load_resumed(self, engine: Engine, state: dict[str, Any], meta: dict) -> None:
        try:
            engine.load_state(state)
        except GanrayError:
            raise
        except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as err:
            if is_worker_loss(err):
                raise
            raise CheckpointError(f"the checkpoint of run {self.resume} at {meta.get('kimg', '?')} kimg does not fit "
                                  f"this config ({brief(err)}); resume with the run's config and topology") from None
        log.info("resumed run %s at %.1f kimg", self.resume, meta.get("images_seen", 0) / 1000)

    def _logged_upto(self, images_seen: int) -> int:
        """Resume: the highest loss step already stored (a killed driver may have logged past its
        last checkpoint; those points are not logged twice)."""
        assert self.logger is not None
        try:
            return max(images_seen, self.logger.max_logged_step(METRIC_NAMES["loss_D"]) or 0)
        except GanrayError:
            return images_seen

    # -- main loop -------------------------------------------------------------------------
    def run(self) -> TrainResult:
        t_start = self._t_engine_start if self._engine is not None else time.perf_counter()
        try:
            resumed = self._fetch_resume_checkpoint() if self.logger is not None and self.resume else None
            engine = self._engine or self.engine_factory(self.config)
        except BaseException:
            if self._engine is not None:  # started by the constructor, not yet owned by a run
                self._engine.close()
            self._abort()
            raise
        self._engine = None
        restore_sigterm = self._install_sigterm()
        try:
            return self._run(engine, t_start, resumed)
        except BaseException:
            self._abort()
            raise
        finally:
            restore_sigterm()
            engine.close()

    def _abort(self) -> None:
        """Close the run after an error: FAILED once training ran, else as the run was before."""
        if self.logger is not None:
            status = "FAILED" if self._progressed or not self.resume else self._resume_status
            self.logger.close(status, timeout=60.0)

    def _install_sigterm(self) -> Callable[[], None]:
        """SIGTERM (preemption, kubectl delete) asks for a checkpoint and a clean exit."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        previous = signal.getsignal(signal.SIGTERM)

        def handler(signum: int, frame: Any) -> None:
            if self._sigterm_at is None:
                self._sigterm_at = time.monotonic()
                log.warning("SIGTERM: finishing the chunk, writing a checkpoint, exiting within fault.grace_s=%g s",
                            self.config.fault.grace_s)
            self._stop_requested.set()

        signal.signal(signal.SIGTERM, handler)
        return lambda: signal.signal(signal.SIGTERM, previous)

    def _run(self, engine: Engine, t_start: float, resumed: Optional[tuple[dict, dict]]) -> TrainResult:
        cfg = self.config
        self._evaluator = Evaluator(cfg)
        if self.logger is not None:
            from ganray.orchestrator.job.checkpoint import CheckpointManager

            self.checkpoints = CheckpointManager(self.logger, cfg.schedule.keep_checkpoints,
                                                 Path(tempfile.mkdtemp(prefix="ganray-ckpt-")))
            if resumed is not None:
                self._load_resumed(engine, *resumed)
                del resumed
            else:
                self.logger.log_params(cfg.flat())
                self.logger.log_text(cfg.to_yaml(), "config.yaml")
                self.logger.set_tags({"ganray.data_hash": engine.data_fingerprint, "ganray.allreduce": engine.allreduce})
            if cfg.tracking.log_system_metrics:
                self._system = SystemMetrics()  # the CPU figure of the first point covers its interval
        self._ipr = cfg.schedule.n_critic * cfg.schedule.batch_size
        total_images = int(round(cfg.schedule.total_kimg * 1000))
        self._stop_images = total_images
        if self.stop_at_kimg is not None:
            self._stop_images = min(total_images, int(round(self.stop_at_kimg * 1000)))
        res0 = engine.run(0)
        st = self._st = _LoopState(res0.images_seen, res0.round_index, res0.round_index)
        self._last_ckpt_images = st.images_seen
        if self.logger is not None and self.resume:
            self.logger.skip_steps_upto(st.images_seen)
            st.last_logged_step = self._logged_upto(st.images_seen)
        self._sync_rounds = max(1, int(round(cfg.schedule.sync_kimg * 1000 / self._ipr)))
        self.keeper.take(engine, st.rounds, st.images_seen)
        self.faults = FaultPolicy(cfg.fault)
        self._clock = ChunkClock(cfg.fault.grace_s)
        self._ivs = {"ckpt": _Interval(cfg.schedule.checkpoint_kimg, st.images_seen),
                     "eval": _Interval(cfg.eval.every_kimg, st.images_seen),
                     "sample": _Interval(cfg.schedule.sample_kimg, st.images_seen)}
        self._last_eval: dict[str, float] = {}
        self._bar = Progress(total_images / 1000.0, enabled=self.progress_enabled)
        self._bar.start(st.images_seen / 1000.0)
        stopped_early = False
        try:
            while st.images_seen < self._stop_images:
                if self._stop_requested.is_set():
                    stopped_early = True
                    break
                try:
                    if not self._iteration(engine):
                        break
                except Exception as exc:  # noqa: BLE001 - only worker loss is handled here
                    if not is_worker_loss(exc):
                        raise
                    self._recover(engine, exc)
        except KeyboardInterrupt:
            log.warning("interrupted: writing a checkpoint; resume with --resume %s", self.run_id)
            self._finish(engine, st.images_seen, interrupted=True)
            raise
        except FaultError:
            self._save_snapshot_checkpoint()
            raise
        finally:
            self._bar.close()
        if st.images_seen < total_images:
            stopped_early = True
        if self._sigterm_at is None:  # after SIGTERM the grace period is for the checkpoint
            scores = self._evaluate(engine, self._evaluator, st.images_seen)
            self._notify_eval(st.images_seen, scores)
            self._last_eval = scores or self._last_eval
        version = self._finish(engine, st.images_seen, interrupted=stopped_early)
        return TrainResult(run_id=self.run_id, images_seen=st.images_seen, rounds=st.rounds, history=st.history,
                           eval=self._last_eval, wall_s=time.perf_counter() - t_start,
                           stopped_early=stopped_early, model_version=version)

    def _iteration(self, engine: Engine) -> bool:
        """One chunk and whatever boundaries it reaches; False when the engine made no progress."""
        st, stop = self._st, self._stop_images
        rounds_left = math.ceil((stop - st.images_seen) / self._ipr)
        n = plan_chunk(st.rounds, self._sync_rounds, self.keeper.every, rounds_left, self._clock.cap())
        t0 = time.perf_counter()
        res = engine.run(n, stop)
        dt = time.perf_counter() - t0
        if res.rounds == 0:
            return False
        self._progressed = True
        self._clock.observe(res.rounds, dt)
        st.absorb(res, dt)
        assert self.faults is not None
        if self.faults.observe(res.rounds, res.metrics.get("skipped"), res.nonfinite_run):
            self._rollback(engine, res)
            return True
        if self.keeper.due(st.rounds) and self.faults.streak == 0:
            self.keeper.take(engine, st.rounds, st.images_seen)
            self.faults.on_snapshot()
        # A stop request logs the rounds since the last point now: the checkpoint follows.
        if res.round_index % self._sync_rounds == 0 or res.images_seen >= stop or self._stop_requested.is_set():
            self._log_window()
            self._bar.update(st.images_seen / 1000.0, res.rounds / max(dt, 1e-9), res.metrics)
            self._boundaries(engine)
        return True

    # -- faults ------------------------------------------------------------------------------
    def _rollback(self, engine: Engine, res: ChunkResult) -> None:
        assert self.faults is not None
        roll_back(engine, self.keeper, self.faults, self.config.fault.lr_backoff, self._st.rounds, res.images_seen)
        self._st.rewind(self.keeper.round_index, self.keeper.images_seen)
        self._fault_event("rollback", res.images_seen)

    def _recover(self, engine: Engine, exc: BaseException) -> None:
        """Recreate lost workers and restore them all from the snapshot (or the last checkpoint)."""
        assert self.faults is not None
        st = self._st
        rounds, images = recover_workers(engine, self.keeper, self.faults, self.config.fault, exc, st.rounds,
                                         st.images_seen, fallback=lambda lost: self._restore_from_checkpoint(engine, lost))
        st.rewind(rounds, images)
        self._fault_event("restart", images)

    def _restore_from_checkpoint(self, engine: Engine, lost: BaseException) -> tuple[int, int]:
        """The snapshot is gone: fall back to the run's latest complete checkpoint in MLflow."""
        if self.logger is None or self.checkpoints is None:
            raise FaultError(f"{lost}; with tracking disabled there is no checkpoint to fall back to") from None
        from ganray.orchestrator.job.checkpoint import latest_checkpoint

        self.checkpoints.wait(timeout=_FINAL_UPLOAD_TIMEOUT_S)
        with tempfile.TemporaryDirectory() as tmp:
            found = latest_checkpoint(self.logger.client, self.logger.run_id, Path(tmp))
        if found is None:
            raise FaultError(f"{lost} and the run has no complete checkpoint yet; start the job again") from None
        engine.load_state(found[0], keep_hyper=True)
        res = engine.run(0)
        self.keeper.take(engine, res.round_index, res.images_seen)
        log.warning("%s: restored the checkpoint at %.1f kimg instead", lost, res.images_seen / 1000)
        return res.round_index, res.images_seen

    def _fault_event(self, kind: str, step: int) -> None:
        if self.logger is None or self.faults is None:
            return
        self.logger.log_metrics(self.faults.metrics(), step=step)
        self.logger.set_tags({"ganray.fault.last_event": f"{kind} at {step / 1000:.1f} kimg",
                              "ganray.fault.rollbacks": str(self.faults.rollbacks),
                              "ganray.fault.restarts": str(self.faults.restarts)})

    def _save_snapshot_checkpoint(self) -> None:
        """Giving up: make the last good snapshot a resumable checkpoint (when it is newer than the last one)."""
        if self.checkpoints is None or self.keeper.latest is None or self.keeper.images_seen <= self._last_ckpt_images:
            return
        try:
            state = self.keeper.state()
        except SnapshotLostError as lost:
            log.warning("%s; the last complete checkpoint stays the one to resume from", lost)
            return
        self._save(state, self.keeper.images_seen)
        if not self.checkpoints.wait(timeout=_FINAL_UPLOAD_TIMEOUT_S):
            log.warning("the checkpoint of the last snapshot was not uploaded in time; resume uses an earlier one")

    # -- boundaries --------------------------------------------------------------------------
    def _log_window(self) -> None:
        st = self._st
        window = st.take_window()
        step = st.images_seen
        if self.logger is None or not window["rounds"] or step <= st.last_logged_step:
            return  # redone rounds of an interval already logged are not logged twice
        point = {METRIC_NAMES[k]: sum(v) / len(v) for k, v in window["metrics"].items() if k in METRIC_NAMES and v}
        point["perf/samples_per_s"] = window["exec_rounds"] * self._ipr / max(window["dt"], 1e-9)
        point["time/compute_s"] = window["compute_s"]
        point["time/comm_s"] = window["comm_s"]
        point["time/wait_s"] = window["wait_s"]
        point["kimg"] = step / 1000.0
        if self._system is not None:
            point.update(self._system.sample())  # same writer, same step as the training point
        self.logger.log_metrics(point, step=step)
        st.last_logged_step = step

    def _boundaries(self, engine: Engine) -> None:
        if self._stop_requested.is_set():
            return  # stopping: the final checkpoint follows, evaluation would eat the grace period
        images_seen = self._st.images_seen
        if self._ivs["eval"].due(images_seen):
            self._last_eval = self._evaluate(engine, self._evaluator, images_seen)
            self._notify_eval(images_seen, self._last_eval)
            self._bar.note_eval(self._last_eval)
        if self._ivs["sample"].due(images_seen):
            self._log_samples(engine, images_seen)
        if self._ivs["ckpt"].due(images_seen) and images_seen < self._stop_images:
            self._checkpoint(engine, images_seen)

    def _generator(self, engine: Engine) -> Any:
        return build_eval_generator(self.config, engine.sample_shape, engine.generator_state())

    def _evaluate(self, engine: Engine, evaluator: Evaluator, images_seen: int) -> dict[str, float]:
        scores = evaluator.evaluate(self._generator(engine))
        if scores and self.logger is not None:
            self.logger.log_metrics({f"eval/{k}": v for k, v in scores.items()}, step=images_seen)
        return scores

    def _notify_eval(self, images_seen: int, scores: dict[str, float]) -> None:
        """The public `on_eval` hook (called here, not in `_evaluate`, so overriding that keeps it)."""
        if self.on_eval is not None:
            self.on_eval(int(images_seen), dict(scores or {}))

    def _log_samples(self, engine: Engine, images_seen: int) -> None:
        if self.logger is None:
            return
        from ganray.orchestrator.tracking.samples import log_samples

        log_samples(self.logger, self.config, self._generator(engine), images_seen)

    def _checkpoint(self, engine: Engine, images_seen: int) -> None:
        if self.checkpoints is not None:
            self._save(engine.state(), images_seen)

    def _save(self, state: dict[str, Any], images_seen: int) -> None:
        assert self.checkpoints is not None
        meta = {"config_hash": self.config.config_hash(ignore=_RESUME_IGNORE),
                "images_seen": images_seen, "kimg": images_seen / 1000.0}
        self.checkpoints.save(state, meta, images_seen / 1000.0)
        self._last_ckpt_images = images_seen

    def _finish(self, engine: Engine, images_seen: int, interrupted: bool) -> Optional[str]:
        if self.logger is None:
            return None
        # After SIGTERM everything left must fit in fault.grace_s (then the node is gone).
        deadline = None if self._sigterm_at is None else self._sigterm_at + self.config.fault.grace_s - 1.0

        def left(default: float) -> float:
            return default if deadline is None else max(0.5, deadline - time.monotonic())

        version = None
        try:
            self._checkpoint(engine, images_seen)
            if self.checkpoints is not None and not self.checkpoints.wait(timeout=left(_FINAL_UPLOAD_TIMEOUT_S)):
                log.warning("the final checkpoint upload did not finish in time (tracking server away?); "
                            "resume will use the last complete checkpoint")
            name = self.config.tracking.model_name
            if name and not interrupted:
                from ganray.orchestrator.tracking.release import log_released_generator

                mv = log_released_generator(self.logger, self.run_id, self._generator(engine), self.config, name)
                version = str(getattr(mv, "version", mv))
        finally:
            self.logger.close("KILLED" if interrupted and images_seen == 0 else "FINISHED", timeout=left(300.0))
        return version


# Keys ignored by the checkpoint's config hash: those allowed to change on resume.
from ganray.orchestrator.job.config import RESUME_ALLOWED as _RESUME_IGNORE  # noqa: E402


def train(config: TrainConfig | str | Path, overrides: Optional[list[str]] = None, **kwargs: Any) -> TrainResult:
    """Python API mirroring `ganray train`: a config object or YAML path, plus `--set` overrides."""
    if not isinstance(config, TrainConfig):
        config = load_config(config, overrides)
    elif overrides:
        from ganray.orchestrator.job.config import config_from_dict

        config = config_from_dict(config.model_dump(mode="json"), overrides)
    return Trainer(config, **kwargs).run()
