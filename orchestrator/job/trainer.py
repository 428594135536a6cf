"""The training loop: chunks of rounds, metric points, and dispatch to the periodic duties.

The loop is the same for every topology (only the engine differs, `engine.make_engine`) and
for every caller: `ganray train`, retraining and Tune trials (through `hooks.JobHooks`) run this
one loop. The coordinator process is the one MLflow writer of the job. Metric steps are images
seen so far (global, counting the real images the discriminators consume), one point per sync
interval holding the mean over its rounds of every statistic the round reports. Sync intervals
are absolute (every `sync_kimg` worth of rounds from round 0), so a resumed run logs the very
points an uninterrupted one would.

At each point the loop asks its duties (`schedule.py`: evaluation, sample plots, checkpoints)
whether they are due; each owns its interval and its "disabled" state; without tracking the
logger is a `NullRunLogger`. Chunks (one engine call each) end at sync and `fault.snapshot_rounds`
boundaries and within a quarter of `fault.grace_s`; chunking never changes results. Faults (`fault.py`):
non-finite rounds roll back to the last snapshot with lower learning rates; a lost worker is recreated
(elastic: the job shrinks onto the survivors, grows back) and restored from it; SIGTERM checkpoints.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from ganray.orchestrator.job.config import TrainConfig, load_config
from ganray.orchestrator.job.engine import ChunkResult, Engine, build_eval_generator, make_engine
from ganray.orchestrator.job.evaluate import Evaluator
from ganray.orchestrator.job.fault import (ChunkClock, FaultError, FaultPolicy, SnapshotKeeper, SnapshotLostError,
                                           is_worker_loss, plan_chunk, recover_workers, roll_back)
from ganray.orchestrator.job.hooks import JobHooks
from ganray.orchestrator.job.loop_state import LoopState
from ganray.orchestrator.job.progress import Progress
from ganray.orchestrator.job.resume import (ResumedRun, StartState, check_resume_config, load_start, logged_upto,
                                            run_checkpoint)
from ganray.orchestrator.job.schedule import FINAL_UPLOAD_TIMEOUT_S, Checkpointer, Interval, NullCheckpointer
from ganray.orchestrator.tracking.null_run_logger import NullRunLogger
from ganray.orchestrator.tracking.samples import NullSamplePlots, SamplePlots
from ganray.workers.system_metrics import SystemMetrics, metric_names

log = logging.getLogger("ganray")


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


EvalHook = Callable[[int, dict[str, float]], None]


class Trainer:
    """Runs one job: owns the engine, the run logger and the loop.

    For `replicated` and `split` the constructor already starts Ray and the worker actors (while
    a helper thread opens the MLflow run), so start-up errors such as an unplaceable job are
    raised here; `run()` trains and always closes the engine, so call it once constructed.

    Hooks (all optional):
    - `on_run_id(run_id)`: once, as soon as the MLflow run exists (before training starts; from
      the helper thread for the Ray topologies).
    - `on_eval(images_seen, scores)`: after each evaluation, the periodic ones (every
      `eval.every_kimg` before the end) and the final one, with the scores as logged
      (`{"modes": ..., "kl": ...}` without the `eval/` prefix; a copy, free to keep). It is called
      whether or not tracking is enabled, after the scores are queued for MLflow. After SIGTERM
      there is no final evaluation, so no final call. An exception it raises fails the run like
      any training error.
    - `hooks`: a `JobHooks` for callers that embed the loop (Tune trials: `tune.trial.TrialHooks`).
    """

    def __init__(self, config: TrainConfig, tracking_uri: Optional[str] = None,
                 resume: Optional[str] = None, stop_at_kimg: Optional[float] = None,
                 progress: bool = True, on_run_id: Optional[Callable[[str], None]] = None,
                 engine_factory: Callable[[TrainConfig], Engine] = make_engine,
                 on_eval: Optional[EvalHook] = None, hooks: Optional[JobHooks] = None) -> None:
        self.config = config
        self.on_eval = on_eval
        self.hooks = hooks if hooks is not None else JobHooks()
        self.stop_at_kimg = stop_at_kimg
        self.resume = resume
        self.progress_enabled = progress
        self.engine_factory = engine_factory
        self.logger: Any = NullRunLogger()
        self.tracked = False     # the logger writes a real run
        self.fresh_run = False   # ... which this Trainer created: it logs the config there
        self.run_id: Optional[str] = None
        self.checkpoints: Any = NullCheckpointer()
        self.faults: Optional[FaultPolicy] = None
        self.keeper = SnapshotKeeper(config.fault.snapshot_rounds)
        self._stop_requested = threading.Event()
        self._sigterm_at: Optional[float] = None
        self._resumed: Optional[ResumedRun] = None   # what --resume learned of the run
        self._progressed = False
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
        from ganray.orchestrator.job.placement import probe

        probe(self.config.resources)  # an unreachable cluster stops here, before a run exists
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
        opened = self.hooks.open_run(config)
        if opened is not None:
            self.logger, self.tracked = opened, opened.run_id is not None
        elif config.tracking.enabled:
            from ganray.orchestrator.tracking import store as tracking
            from ganray.orchestrator.tracking.run_logger import RunLogger

            self.tracking_uri = tracking.resolve_tracking_uri(tracking_uri, config.tracking.uri)
            experiment_id = tracking.prepare_store(self.tracking_uri, config.tracking.experiment)
            if resume:
                self._resumed = check_resume_config(self.tracking_uri, resume, config)
            self.logger = RunLogger(self.tracking_uri, experiment_id, run_id=resume,
                                    run_name=config.tracking.run_name, tags=tracking.run_tags(config),
                                    buffer_size=config.tracking.buffer_size)
            self.tracked, self.fresh_run = True, not resume
        self.run_id = self.logger.run_id
        if on_run_id is not None and self.run_id is not None:
            on_run_id(self.run_id)

    def _start_state(self) -> Optional[StartState]:
        start = self.hooks.start_state(self.config)
        if start is None and self.resume and self.tracked:
            start = run_checkpoint(self.logger.client, self.resume, self.config, self._resumed)
        return start

    # -- main loop -------------------------------------------------------------------------
    def run(self) -> TrainResult:
        t_start = self._t_engine_start if self._engine is not None else time.perf_counter()
        try:
            start = self._start_state()
            engine = self._engine or self.engine_factory(self.config)
        except BaseException:
            if self._engine is not None:  # started by the constructor, not yet owned by a run
                self._engine.close()
            self._abort()
            raise
        self._engine = None
        restore_sigterm = self._install_sigterm()
        try:
            return self._run(engine, t_start, start)
        except SystemExit:
            # A hook ended the job on purpose (Tune stops a trial right after a report, which
            # flushed everything before): the run is complete as far as it went.
            self.logger.close("FINISHED", timeout=30.0)
            raise
        except BaseException:
            self._abort()
            raise
        finally:
            restore_sigterm()
            engine.close()

    def _abort(self) -> None:
        """Close the run after an error: FAILED once training ran, else as the run was before."""
        # A resume that fails before training puts the run's status back.
        before = self._resumed.status_to_restore if self._resumed is not None else "KILLED"
        status = "FAILED" if self._progressed or not self.resume else before
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

    def _begin(self, engine: Engine, start: Optional[StartState]) -> LoopState:
        """Load the start state, log the config of a fresh run, set up the duties."""
        cfg = self.config
        self._evaluator = Evaluator(cfg)
        if start is not None:
            load_start(engine, start)
            start.state = {}  # the weights are in the engine now: free the copy
        elif self.fresh_run:
            self.logger.log_params(cfg.flat())
            self.logger.log_text(cfg.to_yaml(), "config.yaml")
            self.logger.set_tags({"ganray.data_hash": engine.data_fingerprint, "ganray.allreduce": engine.allreduce})
        self._system_sample: Callable[[], dict[str, float]] = dict
        if self.tracked and cfg.tracking.log_system_metrics:  # the CPU figure of the first point covers its interval
            driver = SystemMetrics()  # this machine as `system/<name>`, the workers' nodes as `system/<node>/<name>`
            self._system_sample = lambda: {**metric_names(driver.sample()), **engine.node_metrics()}
        self._ipr = cfg.schedule.n_critic * cfg.schedule.batch_size
        self._total_images = int(round(cfg.schedule.total_kimg * 1000))
        self._stop_images = self._total_images
        if self.stop_at_kimg is not None:
            self._stop_images = min(self._total_images, int(round(self.stop_at_kimg * 1000)))
        res0 = engine.run(0)
        st = LoopState(res0.images_seen, res0.round_index, res0.round_index)
        if self.resume and start is not None:
            self.logger.skip_steps_upto(st.images_seen)
            st.last_logged_step = logged_upto(self.logger, st.images_seen)
        self._sync_rounds = max(1, int(round(cfg.schedule.sync_kimg * 1000 / self._ipr)))
        self.keeper.take(engine, st.rounds, st.images_seen)
        self.faults = FaultPolicy(cfg.fault)
        self._clock = ChunkClock(cfg.fault.grace_s)
        self._eval_due = Interval(cfg.eval.every_kimg, st.images_seen, self._stop_images)
        self.samples: Any = SamplePlots(self.logger, cfg, st.images_seen) if self.tracked else NullSamplePlots()
        if self.tracked and self.hooks.mlflow_checkpoints:
            self.checkpoints = Checkpointer(self.logger, cfg, st.images_seen, self._stop_images)
        self._last_eval: dict[str, float] = {}
        self.hooks.on_start(engine, start, st.images_seen)
        return st

    def _run(self, engine: Engine, t_start: float, start: Optional[StartState]) -> TrainResult:
        st = self._st = self._begin(engine, start)
        self._bar = Progress(self._total_images / 1000.0, enabled=self.progress_enabled)
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
            self._save_snapshot_checkpoint(engine)
            raise
        finally:
            self._bar.close()
        if st.images_seen < self._total_images:
            stopped_early = True
        if self._sigterm_at is None:  # after SIGTERM the grace period is for the checkpoint
            scores = self._evaluate(engine, self._evaluator, st.images_seen)
            self._last_eval = scores or self._last_eval
            self._notify_eval(engine, st.images_seen, scores)
        version = self._finish(engine, st.images_seen, interrupted=stopped_early)
        return TrainResult(run_id=self.run_id, images_seen=st.images_seen, rounds=st.rounds, history=st.history,
                           eval=self._last_eval, wall_s=time.perf_counter() - t_start,
                           stopped_early=stopped_early, model_version=version)

    def _iteration(self, engine: Engine) -> bool:
        """One chunk and whatever boundaries it reaches; False when the engine made no progress."""
        st, stop = self._st, self._stop_images
        grown = engine.grow()  # a round boundary: workers whose capacity came back join here
        if grown is not None and self.faults is not None:
            self._fault_event(grown.line(), st.images_seen, resized=True)
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
        if self.faults.observe(res.rounds, res.metrics, res.nonfinite_run):
            self._rollback(engine, res)
            return True
        if self.keeper.due(st.rounds) and self.faults.streak == 0:
            self.keeper.take(engine, st.rounds, st.images_seen)
            self.faults.on_snapshot()
        # A stop request logs the rounds since the last point now: the checkpoint follows.
        if res.round_index % self._sync_rounds == 0 or res.images_seen >= stop or self._stop_requested.is_set():
            self._log_point(engine)
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
        rounds, images, resize = recover_workers(engine, self.keeper, self.faults, self.config.fault, exc, st.rounds,
                                                 st.images_seen, fallback=lambda lost: self._restore_from_checkpoint(engine, lost))
        st.rewind(rounds, images)
        self._fault_event(resize.line() if resize else "restart", images)

    def _restore_from_checkpoint(self, engine: Engine, lost: BaseException) -> tuple[int, int]:
        """The snapshot is gone: fall back to the run's latest complete checkpoint in MLflow."""
        found = self.checkpoints.latest()
        if found is None:
            raise FaultError(f"{lost} and the run has no complete checkpoint to fall back to; start the job again") from None
        engine.load_state(found[0], keep_hyper=True)
        res = engine.run(0)
        self.keeper.take(engine, res.round_index, res.images_seen)
        log.warning("%s: restored the checkpoint at %.1f kimg instead", lost, res.images_seen / 1000)
        return res.round_index, res.images_seen

    def _fault_event(self, kind: str, step: int, resized: bool = False) -> None:
        assert self.faults is not None
        self.faults.resizes += int(resized)
        self.logger.log_metrics(self.faults.metrics(), step=step)
        self.logger.set_tags({"ganray.fault.last_event": f"{kind} at {step / 1000:.1f} kimg",
                              "ganray.fault.rollbacks": str(self.faults.rollbacks),
                              "ganray.fault.restarts": str(self.faults.restarts),
                              "ganray.fault.resizes": str(self.faults.resizes)})

    def _save_snapshot_checkpoint(self, engine: Engine) -> None:
        """Giving up: make the last good snapshot a resumable checkpoint (when it is newer than the last one)."""
        if self.keeper.latest is None or not self.checkpoints.behind(self.keeper.images_seen):
            return
        try:
            state = self.keeper.state(engine)
        except SnapshotLostError as lost:
            log.warning("%s; the last complete checkpoint stays the one to resume from", lost)
            return
        self.checkpoints.save(state, self.keeper.images_seen, engine.sample_shape)
        if not self.checkpoints.wait(timeout=FINAL_UPLOAD_TIMEOUT_S):
            log.warning("the checkpoint of the last snapshot was not uploaded in time; resume uses an earlier one")

    # -- boundaries --------------------------------------------------------------------------
    def _log_point(self, engine: Engine) -> None:
        point = self._st.take_point(self._ipr)
        if point is None:
            return  # redone rounds of an interval already logged are not logged twice
        point.update(self._system_sample())  # same writer, same step as the training point
        if engine.worker_count:  # every worker of the job: an elastic world's size over time
            point["topology/workers"] = float(engine.worker_count)
        self.logger.log_metrics(point, step=self._st.images_seen)

    def _boundaries(self, engine: Engine) -> None:
        if self._stop_requested.is_set():
            return  # stopping: the final checkpoint follows, evaluation would eat the grace period
        images_seen = self._st.images_seen
        if self._eval_due.due(images_seen):
            self._last_eval = self._evaluate(engine, self._evaluator, images_seen)
            self._notify_eval(engine, images_seen, self._last_eval)
            self._bar.note_eval(self._last_eval)
        if self.samples.due(images_seen):
            self.samples.log(self._generator(engine), images_seen)
        if self.checkpoints.due(images_seen):
            self.checkpoints.checkpoint(engine, images_seen)

    def _generator(self, engine: Engine) -> Any:
        return build_eval_generator(self.config, engine.sample_shape, engine.generator_state())

    def _evaluate(self, engine: Engine, evaluator: Evaluator, images_seen: int) -> dict[str, float]:
        scores = evaluator.evaluate(self._generator(engine))
        if scores:
            self.logger.log_metrics({f"eval/{k}": v for k, v in scores.items()}, step=images_seen)
        return scores

    def _notify_eval(self, engine: Engine, images_seen: int, scores: dict[str, float]) -> None:
        """The hooks (called here, not in `_evaluate`, so a subclass overriding that keeps them)."""
        if self.on_eval is not None:
            self.on_eval(int(images_seen), dict(scores or {}))
        self.hooks.on_eval(engine, int(images_seen), dict(scores or {}))

    def _finish(self, engine: Engine, images_seen: int, interrupted: bool) -> Optional[str]:
        # After SIGTERM everything left must fit in fault.grace_s (then the node is gone).
        deadline = None if self._sigterm_at is None else self._sigterm_at + self.config.fault.grace_s - 1.0

        def left(default: float) -> float:
            return default if deadline is None else max(0.5, deadline - time.monotonic())

        version = None
        try:
            self.checkpoints.checkpoint(engine, images_seen)
            if not self.checkpoints.wait(timeout=left(FINAL_UPLOAD_TIMEOUT_S)):
                log.warning("the final checkpoint upload did not finish in time (tracking server away?); "
                            "resume will use the last complete checkpoint")
            name = self.config.tracking.model_name
            if name and not interrupted and self.tracked and self.hooks.release_model:
                from ganray.orchestrator.tracking.release import log_released_generator

                mv = log_released_generator(self.logger, self.run_id, self._generator(engine), self.config, name)
                version = str(getattr(mv, "version", mv))
        finally:
            self.logger.close("KILLED" if interrupted and images_seen == 0 else "FINISHED", timeout=left(300.0))
        return version


def train(config: TrainConfig | str | Path, overrides: Optional[list[str]] = None, **kwargs: Any) -> TrainResult:
    """Python API mirroring `ganray train`: a config object or YAML path, plus `--set` overrides."""
    if not isinstance(config, TrainConfig):
        config = load_config(config, overrides)
    elif overrides:
        from ganray.orchestrator.job.config import config_from_dict

        config = config_from_dict(config.model_dump(mode="json"), overrides)
    return Trainer(config, **kwargs).run()
