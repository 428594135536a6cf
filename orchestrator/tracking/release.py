"""Released generators: the MLflow model registry entry and the digest-checked state behind it.

A release logs the EMA generator twice, for two readers:
- `mlflow.pytorch.log_model` in the `pt2` format (torch.export; loading it unpickles no code,
  and MLflow exports the batch dimension as dynamic), registered under the model name, for
  MLflow's own serving and `mlflow.pyfunc.load_model`; a conditional generator takes two inputs,
  (z, class), the class an int64 per row, through `mlflow.pytorch.load_model` (MLflow's pyfunc
  wrapper of the pytorch flavor hands a model one tensor, so it serves unconditional generators);
- `release/state/` (a ganray checkpoint holding only `G_ema`) and `release/config.yaml` in the
  run, from which `ganray sample --model` / `evaluate --model` rebuild the generator with
  ganray's own code (`released_model.py`). The model version's tags `ganray.state_sha256` and
  `ganray.config_sha256` pin both, so a later release from the same run, or anyone who can
  write the run's artifacts, cannot silently change what an older version means or runs.

The `champion` alias is never set here: promotion is the retrain gate's decision alone.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import torch
from torch import nn

from ganray.models.latent import draw_latent, latent_of
from ganray.orchestrator.errors import TrackingError
from ganray.orchestrator.job.checkpoint import MANIFEST, list_checkpoints, snapshot_state, write_checkpoint
from ganray.orchestrator.job.config import TrainConfig
from ganray.orchestrator.job.evaluate import generator_classes
from ganray.orchestrator.tracking.run_logger import RunLogger
from ganray.orchestrator.tracking.store import ganray_version, redact, scrub

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

RELEASE_DIR = "release"
STATE_PATH = f"{RELEASE_DIR}/state"
RELEASE_CONFIG = "config.yaml"
MODEL_NAME_IN_RUN = "generator"
_EXAMPLE_BATCH = 4
_fluent_lock = threading.Lock()  # the fluent scope below changes process-global MLflow state


def _reason(exc: BaseException) -> str:
    lines = scrub(str(exc)).strip().splitlines()
    return lines[0][:300] if lines else type(exc).__name__


@contextlib.contextmanager
def _fluent_scope(uri: str, experiment_id: str) -> Iterator[None]:
    """MLflow's fluent tracking URI and experiment set for one `log_model`, then restored.

    `log_model` reads the global tracking URI and creates its logged model in the *active*
    experiment (not the run's), so both must point at the run for the duration of the call.
    """
    import mlflow
    from mlflow.tracking._tracking_service import utils as tracking_utils

    names = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME")
    with _fluent_lock:
        saved_uri = getattr(tracking_utils, "_tracking_uri", None)
        saved_env = {name: os.environ.get(name) for name in names}
        mlflow.set_tracking_uri(uri)
        os.environ["MLFLOW_EXPERIMENT_ID"] = experiment_id
        os.environ.pop("MLFLOW_EXPERIMENT_NAME", None)
        try:
            yield
        finally:
            mlflow.set_tracking_uri(saved_uri)
            for name, value in saved_env.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


def _pip_requirements() -> list[str]:
    """Given explicitly: inferring them costs seconds and pins this machine's whole environment."""
    import mlflow

    return [f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}",
            f"numpy=={np.__version__}"]


def log_released_generator(client_or_logger: "MlflowClient | RunLogger", run_id: str, generator: nn.Module,
                           config: TrainConfig, model_name: str, images_seen: int | None = None,
                           extra_tags: dict[str, str] | None = None) -> "ModelVersion":
    """Log `generator` (the EMA copy) from `run_id` and register it as a new version of `model_name`.

    `images_seen` defaults to the one recorded in the run's newest complete checkpoint.
    """
    import mlflow.pytorch
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    if isinstance(client_or_logger, RunLogger):
        client_or_logger.flush()  # what the run logged so far lands before the model that sums it up
        client, uri = client_or_logger.client, client_or_logger.uri
    else:
        client = client_or_logger
        uri = client.tracking_uri
    assert isinstance(client, MlflowClient)
    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        raise TrackingError(f"cannot release from run {run_id} in {redact(uri)} ({_reason(exc)})") from None

    if images_seen is None:
        images_seen = _checkpoint_images_seen(client, run_id)
    model = copy.deepcopy(generator).to("cpu").eval()
    z_dim = int(getattr(model, "z_dim", config.model.z_dim))
    sample_shape = [int(s) for s in getattr(model, "sample_shape", ())]
    meta: dict[str, Any] = {"config_hash": config.config_hash(), "images_seen": int(images_seen),
                            "kimg": images_seen / 1000.0, "run_id": run_id, "model_name": model_name,
                            "z_dim": z_dim, "latent": latent_of(model), "sample_shape": sample_shape, "ganray_version": ganray_version(),
                            # 0: G(z); otherwise the pt2 model takes (z, class)
                            "num_classes": generator_classes(model)}
    config_text = scrub(config.to_yaml()).encode()
    meta["config_sha256"] = hashlib.sha256(config_text).hexdigest()
    with tempfile.TemporaryDirectory(prefix="ganray-release-") as tmp:
        folder = Path(tmp) / RELEASE_DIR
        write_checkpoint({"G_ema": snapshot_state(model.state_dict())}, folder / "state", meta)
        (folder / RELEASE_CONFIG).write_bytes(config_text)
        digest = json.loads((folder / "state" / MANIFEST).read_text())["files"]["G_ema.pt"]["sha256"]
        try:
            client.log_artifacts(run_id, str(folder), RELEASE_DIR)
        except MlflowException as exc:
            raise TrackingError(f"cannot upload the released state of run {run_id} to {redact(uri)} "
                                f"({_reason(exc)})") from None

    if getattr(model, "evals_per_sample", None) is not None:
        # The energy learner's sampler searches D's input gradient inside its forward, which
        # torch.export cannot capture: its release is the state and config alone (no pt2).
        version = _register_release_folder(client, model_name, run_id, uri)
    else:
        z = draw_latent(latent_of(model), (_EXAMPLE_BATCH, z_dim), generator=torch.Generator().manual_seed(0)).numpy()
        example, signature = _example_and_signature(model, z, meta["num_classes"])
        try:
            with _fluent_scope(uri, run.info.experiment_id):
                info = mlflow.pytorch.log_model(
                    model, name=MODEL_NAME_IN_RUN, signature=signature, input_example=example,
                    pip_requirements=_pip_requirements(), run_id=run_id, registered_model_name=model_name,
                    serialization_format="pt2")
        except MlflowException as exc:
            raise TrackingError(f"cannot log or register model '{model_name}' in {redact(uri)} ({_reason(exc)})") from None
        except Exception as exc:  # noqa: BLE001 - torch.export failures come in many types
            raise TrackingError(f"the generator cannot be exported with torch.export for release ({_reason(exc)}); "
                                "its forward must be traceable for a dynamic batch size") from None
        version = str(info.registered_model_version)
    tags = {"ganray.run_id": run_id, "ganray.config_hash": meta["config_hash"],
            "ganray.images_seen": str(int(images_seen)), "ganray.state_sha256": digest,
            "ganray.config_sha256": meta["config_sha256"],
            "ganray.state_path": STATE_PATH, "ganray.version": ganray_version(), **(extra_tags or {})}
    for key, value in tags.items():
        client.set_model_version_tag(model_name, version, key, scrub(str(value)))
    return client.get_model_version(model_name, version)


def _example_and_signature(model: nn.Module, z: np.ndarray, num_classes: int) -> tuple[Any, Any]:
    """The input example and signature of the pt2 export: z alone, or (z, class) for a
    conditional generator (named tensor inputs, the batch dimension dynamic in both)."""
    from mlflow.models import ModelSignature, infer_signature
    from mlflow.types.schema import Schema, TensorSpec

    if not num_classes:
        with torch.no_grad():
            out = model(torch.from_numpy(z)).numpy()
        return z, infer_signature(z, out)
    y = (np.arange(len(z)) % num_classes).astype(np.int64)
    with torch.no_grad():
        out = model(torch.from_numpy(z), torch.from_numpy(y)).numpy()
    inputs = Schema([TensorSpec(np.dtype(np.float32), (-1, z.shape[1]), "z"),
                     TensorSpec(np.dtype(np.int64), (-1,), "class")])
    outputs = Schema([TensorSpec(np.dtype(np.float32), (-1, *out.shape[1:]))])
    return (z, y), ModelSignature(inputs=inputs, outputs=outputs)


def _register_release_folder(client: "MlflowClient", model_name: str, run_id: str, uri: str) -> str:
    """A new version of `model_name` whose source is the run's release folder (state + config)."""
    from mlflow.exceptions import MlflowException

    try:
        with contextlib.suppress(MlflowException):  # the name is registered already
            client.create_registered_model(model_name)
        mv = client.create_model_version(model_name, source=f"runs:/{run_id}/{RELEASE_DIR}", run_id=run_id)
    except MlflowException as exc:
        raise TrackingError(f"cannot register model '{model_name}' in {redact(uri)} ({_reason(exc)})") from None
    return str(mv.version)


def _checkpoint_images_seen(client: "MlflowClient", run_id: str) -> int:
    """images_seen of the run's newest complete checkpoint (0 when it has none)."""
    complete = list_checkpoints(client, run_id)
    if not complete:
        return 0
    with tempfile.TemporaryDirectory(prefix="ganray-manifest-") as tmp:
        path = client.download_artifacts(run_id, f"{complete[-1]}/{MANIFEST}", tmp)
        meta = json.loads(Path(path).read_text())
    return int(meta.get("images_seen", round(float(meta.get("kimg", 0.0)) * 1000)))
