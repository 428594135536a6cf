"""The training loop: chunks of rounds, metric logging, evaluation, checkpoints, resume.

The loop is the same for every topology; only the engine differs (`engine.make_engine`). The
coordinator process is the one MLflow writer of the job. Metric steps are images seen so far
(global, counting the real images the discriminators consume), one point per sync interval
holding the mean over its rounds.
"""

from __future__ import annotations

import logging
import math
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from ganray.models.errors import CheckpointError, ConfigError
from ganray.orchestrator.config import TrainConfig, config_differences, load_config
from ganray.orchestrator.engine import Engine, build_eval_generator, make_engine
from ganray.orchestrator.evaluate import Evaluator
from ganray.orchestrator.progress import Progress

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


class Trainer:
    """Runs one job: owns the engine, the MLflow run (through `RunLogger`) and the schedule."""

    def __init__(self, config: TrainConfig, tracking_uri: Optional[str] = None,
                 resume: Optional[str] = None, stop_at_kimg: Optional[float] = None,
                 progress: bool = True, on_run_id: Optional[Callable[[str], None]] = None,
                 engine_factory: Callable[[TrainConfig], Engine] = make_engine) -> None:
        self.config = config
        self.stop_at_kimg = stop_at_kimg
        self.resume = resume
        self.progress_enabled = progress
        self.engine_factory = engine_factory
        self.logger = None
        self.checkpoints = None
        self.run_id: Optional[str] = None
        self._stop_requested = threading.Event()
        if config.tracking.enabled:
            from ganray.orchestrator import tracking

            self.tracking_uri = tracking.resolve_tracking_uri(tracking_uri, config.tracking.uri)
            experiment_id = tracking.prepare_store(self.tracking_uri, config.tracking.experiment)
            if resume:
                self._check_resume_config(tracking, resume)
            self.logger = tracking.RunLogger(self.tracking_uri, experiment_id, run_id=resume,
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
            client.get_run(run_id)
        except Exception:
            raise CheckpointError(f"--resume {run_id}: no such run in {tracking.redact(self.tracking_uri)}; "
                                  "pass a run id printed by an earlier `ganray train`") from None
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

    def _restore(self, engine: Engine) -> None:
        from ganray.orchestrator.checkpoint import latest_checkpoint

        assert self.logger is not None and self.resume
        with tempfile.TemporaryDirectory() as tmp:
            found = latest_checkpoint(self.logger.client, self.resume, Path(tmp))
        if found is None:
            raise CheckpointError(f"--resume {self.resume}: the run has no complete checkpoint; "
                                  "start a new run instead")
        state, meta = found
        if meta.get("config_hash") not in (None, self.config.config_hash(ignore=_RESUME_IGNORE)):
            raise CheckpointError("the checkpoint was written with another config; resume with the run's config")
        engine.load_state(state)
        log.info("resumed run %s at %.1f kimg", self.resume, meta.get("images_seen", 0) / 1000)

    # -- main loop -------------------------------------------------------------------------
    def run(self) -> TrainResult:
        cfg = self.config
        t_start = time.perf_counter()
        engine = self.engine_factory(cfg)
        try:
            return self._run(engine, t_start)
        finally:
            engine.close()

    def _install_sigterm(self) -> Callable[[], None]:
        """SIGTERM (preemption, kubectl delete) asks for a checkpoint and a clean exit."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        previous = signal.getsignal(signal.SIGTERM)

        def handler(signum: int, frame: Any) -> None:
            log.warning("SIGTERM: writing a checkpoint and stopping")
            self._stop_requested.set()

        signal.signal(signal.SIGTERM, handler)
        return lambda: signal.signal(signal.SIGTERM, previous)

    def _run(self, engine: Engine, t_start: float) -> TrainResult:
        cfg = self.config
        evaluator = Evaluator(cfg)
        if self.logger is not None:
            from ganray.orchestrator.checkpoint import CheckpointManager

            self.checkpoints = CheckpointManager(self.logger, cfg.schedule.keep_checkpoints,
                                                 Path(tempfile.mkdtemp(prefix="ganray-ckpt-")))
            if self.resume:
                self._restore(engine)
            else:
                self.logger.log_params(cfg.flat())
                self.logger.log_text(cfg.to_yaml(), "config.yaml")
                self.logger.set_tags({"ganray.data_hash": engine.data_fingerprint})
        images_per_round = cfg.schedule.n_critic * cfg.schedule.batch_size
        total_images = int(round(cfg.schedule.total_kimg * 1000))
        stop_images = total_images
        if self.stop_at_kimg is not None:
            stop_images = min(total_images, int(round(self.stop_at_kimg * 1000)))
        state0 = engine.run(0)
        images_seen = state0.images_seen
        if self.logger is not None and self.resume:
            self.logger.skip_steps_upto(images_seen)
        chunk_rounds = max(1, int(round(cfg.schedule.sync_kimg * 1000 / images_per_round)))
        ckpt_iv = _Interval(cfg.schedule.checkpoint_kimg, images_seen)
        eval_iv = _Interval(cfg.eval.every_kimg, images_seen)
        sample_iv = _Interval(cfg.schedule.sample_kimg, images_seen)
        history: dict[str, list[float]] = {}
        last_eval: dict[str, float] = {}
        bar = Progress(total_images / 1000.0, enabled=self.progress_enabled)
        bar.start(images_seen / 1000.0)
        restore_sigterm = self._install_sigterm()
        stopped_early = False
        rounds = state0.round_index
        try:
            while images_seen < stop_images:
                if self._stop_requested.is_set():
                    stopped_early = True
                    break
                rounds_left = math.ceil((stop_images - images_seen) / images_per_round)
                t0 = time.perf_counter()
                res = engine.run(min(chunk_rounds, rounds_left), stop_images)
                dt = time.perf_counter() - t0
                if res.rounds == 0:
                    break
                images_seen, rounds = res.images_seen, res.round_index
                for k, values in res.metrics.items():
                    history.setdefault(k, []).extend(values)
                self._log_chunk(res, dt, images_per_round)
                bar.update(images_seen / 1000.0, res.rounds / max(dt, 1e-9), res.metrics)
                if eval_iv.due(images_seen):
                    last_eval = self._evaluate(engine, evaluator, images_seen)
                    bar.note_eval(last_eval)
                if sample_iv.due(images_seen):
                    self._log_samples(engine, images_seen)
                if ckpt_iv.due(images_seen) and images_seen < stop_images:
                    self._checkpoint(engine, images_seen)
        except KeyboardInterrupt:
            stopped_early = True
            log.warning("interrupted: writing a checkpoint; resume with --resume %s", self.run_id)
            self._finish(engine, images_seen, evaluator, interrupted=True)
            raise
        finally:
            bar.close()
            restore_sigterm()
        if images_seen < total_images:
            stopped_early = True
        last_eval = self._evaluate(engine, evaluator, images_seen) or last_eval
        version = self._finish(engine, images_seen, evaluator, interrupted=stopped_early)
        return TrainResult(run_id=self.run_id, images_seen=images_seen, rounds=rounds, history=history,
                           eval=last_eval, wall_s=time.perf_counter() - t_start,
                           stopped_early=stopped_early, model_version=version)

    # -- boundaries --------------------------------------------------------------------------
    def _log_chunk(self, res: Any, dt: float, images_per_round: int) -> None:
        if self.logger is None or not res.metrics:
            return
        point = {METRIC_NAMES.get(k, k): sum(v) / len(v) for k, v in res.metrics.items() if k in METRIC_NAMES}
        point["perf/samples_per_s"] = res.rounds * images_per_round / max(dt, 1e-9)
        point["time/compute_s"] = res.time_compute_s
        point["time/comm_s"] = res.time_comm_s
        point["time/wait_s"] = max(0.0, dt - res.time_compute_s - res.time_comm_s) if not res.time_wait_s else res.time_wait_s
        point["kimg"] = res.images_seen / 1000.0
        self.logger.log_metrics(point, step=res.images_seen)

    def _generator(self, engine: Engine) -> Any:
        return build_eval_generator(self.config, engine.sample_shape, engine.generator_state())

    def _evaluate(self, engine: Engine, evaluator: Evaluator, images_seen: int) -> dict[str, float]:
        scores = evaluator.evaluate(self._generator(engine))
        if scores and self.logger is not None:
            self.logger.log_metrics({f"eval/{k}": v for k, v in scores.items()}, step=images_seen)
        return scores

    def _log_samples(self, engine: Engine, images_seen: int) -> None:
        if self.logger is None:
            return
        from ganray.orchestrator.samples import log_samples

        log_samples(self.logger, self.config, self._generator(engine), images_seen)

    def _checkpoint(self, engine: Engine, images_seen: int, block: bool = False) -> None:
        if self.checkpoints is None:
            return
        meta = {"config_hash": self.config.config_hash(ignore=_RESUME_IGNORE),
                "images_seen": images_seen, "kimg": images_seen / 1000.0}
        self.checkpoints.save(engine.state(), meta, images_seen / 1000.0, block=block)

    def _finish(self, engine: Engine, images_seen: int, evaluator: Evaluator, interrupted: bool) -> Optional[str]:
        if self.logger is None:
            return None
        version = None
        try:
            self._checkpoint(engine, images_seen, block=True)
            if self.checkpoints is not None and not self.checkpoints.wait(timeout=_FINAL_UPLOAD_TIMEOUT_S):
                log.warning("the final checkpoint upload did not finish within %.0f s (tracking server away?); "
                            "it is still queued until the logger gives up", _FINAL_UPLOAD_TIMEOUT_S)
            name = self.config.tracking.model_name
            if name and not interrupted:
                from ganray.orchestrator.release import log_released_generator

                mv = log_released_generator(self.logger, self.run_id, self._generator(engine), self.config, name)
                version = str(getattr(mv, "version", mv))
        finally:
            self.logger.close("KILLED" if interrupted and images_seen == 0 else "FINISHED")
        return version


# Keys ignored by the checkpoint's config hash: those allowed to change on resume.
from ganray.orchestrator.config import RESUME_ALLOWED as _RESUME_IGNORE  # noqa: E402


def train(config: TrainConfig | str | Path, overrides: Optional[list[str]] = None, **kwargs: Any) -> TrainResult:
    """Python API mirroring `ganray train`: a config object or YAML path, plus `--set` overrides."""
    if not isinstance(config, TrainConfig):
        config = load_config(config, overrides)
    elif overrides:
        from ganray.orchestrator.config import config_from_dict

        config = config_from_dict(config.model_dump(mode="json"), overrides)
    return Trainer(config, **kwargs).run()
