"""Released generators: the MLflow model registry entry and the digest-checked state behind it.

A release logs the EMA generator twice, for two readers:
- `mlflow.pytorch.log_model` in the `pt2` format (torch.export; loading it unpickles no code,
  and MLflow exports the batch dimension as dynamic), registered under the model name, for
  MLflow's own serving and `mlflow.pyfunc.load_model`;
- `release/state/` (a ganray checkpoint holding only `G_ema`) and `release/config.yaml` in the
  run, from which `ganray sample --model` / `evaluate --model` rebuild the generator with
  ganray's own code. The model version's tag `ganray.state_sha256` pins that state, so a later
  release from the same run cannot silently change what an older version means.

The `champion` alias is never set here: promotion is the retrain gate's decision alone.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import torch
import yaml
from torch import nn

from ganray.models.latent import draw_latent, latent_of
from ganray.orchestrator.errors import TrackingError
from ganray.orchestrator.job.checkpoint import (MANIFEST, latest_checkpoint, list_checkpoints, read_checkpoint, snapshot_state,
                                           write_checkpoint)
from ganray.orchestrator.job.config import TrainConfig, config_from_dict
from ganray.orchestrator.tracking.run_logger import RunLogger
from ganray.orchestrator.tracking.store import CONFIG_ARTIFACT, ganray_version, redact, scrub

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

RELEASE_DIR = "release"
STATE_PATH = f"{RELEASE_DIR}/state"
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
    from mlflow.models import infer_signature

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
                            "z_dim": z_dim, "latent": latent_of(model), "sample_shape": sample_shape, "ganray_version": ganray_version()}
    with tempfile.TemporaryDirectory(prefix="ganray-release-") as tmp:
        folder = Path(tmp) / RELEASE_DIR
        write_checkpoint({"G_ema": snapshot_state(model.state_dict())}, folder / "state", meta)
        (folder / "config.yaml").write_text(scrub(config.to_yaml()))
        digest = json.loads((folder / "state" / MANIFEST).read_text())["files"]["G_ema.pt"]["sha256"]
        try:
            client.log_artifacts(run_id, str(folder), RELEASE_DIR)
        except MlflowException as exc:
            raise TrackingError(f"cannot upload the released state of run {run_id} to {redact(uri)} "
                                f"({_reason(exc)})") from None

    z = draw_latent(latent_of(model), (_EXAMPLE_BATCH, z_dim), generator=torch.Generator().manual_seed(0)).numpy()
    with torch.no_grad():
        out = model(torch.from_numpy(z)).numpy()
    signature = infer_signature(z, out)
    try:
        with _fluent_scope(uri, run.info.experiment_id):
            info = mlflow.pytorch.log_model(
                model, name=MODEL_NAME_IN_RUN, signature=signature, input_example=z,
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
            "ganray.state_path": STATE_PATH, "ganray.version": ganray_version(), **(extra_tags or {})}
    for key, value in tags.items():
        client.set_model_version_tag(model_name, version, key, scrub(str(value)))
    return client.get_model_version(model_name, version)


def _checkpoint_images_seen(client: "MlflowClient", run_id: str) -> int:
    """images_seen of the run's newest complete checkpoint (0 when it has none)."""
    complete = list_checkpoints(client, run_id)
    if not complete:
        return 0
    with tempfile.TemporaryDirectory(prefix="ganray-manifest-") as tmp:
        path = client.download_artifacts(run_id, f"{complete[-1]}/{MANIFEST}", tmp)
        meta = json.loads(Path(path).read_text())
    return int(meta.get("images_seen", round(float(meta.get("kimg", 0.0)) * 1000)))


# ---------------------------------------------------------------------------------------------
# Reading releases back

_MODEL_URI = re.compile(r"models:/(?P<name>[^@]+?)(?:/(?P<version>[^/@]+)|@(?P<alias>[^/@]+))")


def _model_names(client: "MlflowClient") -> list[str]:
    """Registered model names in the store (retrain locks left out); [] when they cannot be listed."""
    from ganray.orchestrator.retrain.lock import LOCK_SUFFIX

    try:
        models = client.search_registered_models(max_results=1000)
    except Exception:  # noqa: BLE001 - only a hint for an error message
        return []
    return sorted(m.name for m in models if not m.name.endswith(LOCK_SUFFIX))


def _version_numbers(client: "MlflowClient", name: str) -> list[int]:
    """The model's version numbers, ascending; [] when it has none or they cannot be listed."""
    try:
        versions = client.search_model_versions(f"name='{name}'")
    except Exception:  # noqa: BLE001 - only a hint for an error message
        return []
    return sorted(int(v.version) for v in versions if str(v.version).isdigit())


def _listing(items: list[str], limit: int = 8) -> str:
    if len(items) <= limit:
        return ", ".join(items)
    return ", ".join(items[:3]) + ", ..., " + ", ".join(items[-3:]) + f" ({len(items)} in all)"


def _no_model_error(client: "MlflowClient", name: str, where: str) -> TrackingError:
    """Unknown registered model: what the store does have, and how to point at the right one."""
    import difflib

    names = _model_names(client)
    if not names:
        return TrackingError(f"no registered model '{name}' in {where}, which has no registered models; check the "
                             "name or pass --tracking-uri of the store the model was registered in (a run registers "
                             "its generator when trained with --set tracking.model_name=NAME)")
    close = difflib.get_close_matches(name, names, n=1)
    if close:
        return TrackingError(f"no registered model '{name}' in {where}; did you mean '{close[0]}'? Use "
                             f"models:/{close[0]}/VERSION, or check the name or --tracking-uri")
    return TrackingError(f"no registered model '{name}' in {where} (it has {_listing(names)}); check the name or "
                         "pass --tracking-uri of the store the model was registered in")


def _no_versions_error(name: str, where: str) -> TrackingError:
    return TrackingError(f"registered model '{name}' has no versions in {where}; release one by training with "
                         f"--set tracking.model_name={name}")


def _missing_version_or_alias_error(client: "MlflowClient", name: str, where: str, version: str | None,
                                    alias: str | None, aliases: dict[str, str]) -> TrackingError:
    """Unknown version or alias: the versions and aliases the model has, and the URI or command that works."""
    numbers = _version_numbers(client, name)
    if not numbers:
        return _no_versions_error(name, where)
    newest = numbers[-1]
    have = f"its versions are {_listing([str(n) for n in numbers])}"
    if aliases:
        have += "; its aliases are " + ", ".join(f"{a} (version {v})" for a, v in sorted(aliases.items()))
    if alias is None:
        use = f"use models:/{name}/{newest}" + (f" or models:/{name}@{sorted(aliases)[0]}" if aliases else "")
        return TrackingError(f"registered model '{name}' has no version {version} in {where}; {have}; {use}")
    if alias == "champion":
        how = f"set the alias with `ganray promote {name} {newest}`"
    else:
        how = (f"set the alias with MlflowClient().set_registered_model_alias('{name}', '{alias}', {newest}) "
               "or in the MLflow UI")
    return TrackingError(f"registered model '{name}' has no alias '{alias}' in {where}; {have}; use "
                         f"models:/{name}/{newest} or {how}")


def registered_model(client: "MlflowClient", name: str, where: str) -> Any:
    """The registered model `name`; a missing one is a one-line error listing the models that
    exist (`where` is the redacted tracking URI, for messages)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise _no_model_error(client, name, where) from None
        raise TrackingError(f"cannot read registered model '{name}' from {where} ({_reason(exc)})") from None


def _model_version(uri: str, client: "MlflowClient") -> "ModelVersion":
    from mlflow.exceptions import MlflowException

    match = _MODEL_URI.fullmatch(uri.strip())
    if not match:
        raise TrackingError(f"'{uri}' is not a registered model URI; use models:/NAME/VERSION or models:/NAME@ALIAS")
    name, version, alias = match.group("name"), match.group("version"), match.group("alias")
    where = redact(client.tracking_uri)
    model = registered_model(client, name, where)
    aliases = {str(a): str(v) for a, v in (getattr(model, "aliases", None) or {}).items()}
    try:
        if alias is not None:
            return client.get_model_version_by_alias(name, alias)
        if version == "latest":
            versions = client.search_model_versions(f"name='{name}'")
            if not versions:
                raise _no_versions_error(name, where)
            return max(versions, key=lambda v: int(v.version))
        if not version.isdigit():
            raise TrackingError(f"model version '{version}' in '{uri}' is not a number; use models:/{name}/1 "
                                f"or models:/{name}@ALIAS")
        return client.get_model_version(name, version)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            raise _missing_version_or_alias_error(client, name, where, version, alias, aliases) from None
        what = f"alias '{alias}'" if alias is not None else f"version {version}"
        raise TrackingError(f"cannot resolve {what} of model '{name}' in {where} ({_reason(exc)})") from None


def resolve_model_uri(uri: str, client: "MlflowClient") -> tuple[str, str]:
    """`models:/NAME/VERSION` or `models:/NAME@ALIAS` (or `models:/NAME/latest`) -> (run_id, version)."""
    mv = _model_version(uri, client)
    if not mv.run_id:
        raise TrackingError(f"model '{mv.name}' version {mv.version} has no source run; it was not released by ganray")
    return mv.run_id, str(mv.version)


def _has(client: "MlflowClient", run_id: str, folder: str | None, name: str) -> bool:
    return any(entry.path.rsplit("/", 1)[-1] == name for entry in client.list_artifacts(run_id, folder))


def _read_config(path: Path) -> TrainConfig:
    return config_from_dict(yaml.safe_load(path.read_text()))


def _load_release(client: "MlflowClient", run_id: str, expected_digest: str | None,
                  tmp: Path) -> tuple[dict, TrainConfig]:
    local = Path(client.download_artifacts(run_id, RELEASE_DIR, str(tmp)))
    if expected_digest is not None:
        manifest = json.loads((local / "state" / MANIFEST).read_text())
        found = manifest.get("files", {}).get("G_ema.pt", {}).get("sha256")
        if found != expected_digest:
            raise TrackingError(f"the released state in run {run_id} is not the one this model version was "
                                "registered with (released again from the same run?); use the newest version")
    state, _ = read_checkpoint(local / "state")
    if "G_ema" not in state:
        raise TrackingError(f"the released state of run {run_id} has no G_ema part")
    return state["G_ema"], _read_config(local / "config.yaml")


def load_released_state(client: "MlflowClient", model_uri_or_run_id: str) -> tuple[dict, TrainConfig]:
    """(G_ema state dict, config) of a registered version, or of a run (its release, else its newest checkpoint).

    Everything is digest-checked and loaded weights-only: the exported/pickled model is never used.
    """
    from mlflow.exceptions import MlflowException

    source = model_uri_or_run_id.strip()
    where = redact(client.tracking_uri)
    with tempfile.TemporaryDirectory(prefix="ganray-load-") as tmp_name:
        tmp = Path(tmp_name)
        try:
            if source.startswith("models:/"):
                mv = _model_version(source, client)
                if not mv.run_id:
                    raise TrackingError(f"model '{mv.name}' version {mv.version} has no source run")
                if not _has(client, mv.run_id, STATE_PATH, MANIFEST):
                    raise TrackingError(f"model '{mv.name}' version {mv.version} has no ganray state in run "
                                        f"{mv.run_id}; it was not released by ganray")
                return _load_release(client, mv.run_id, mv.tags.get("ganray.state_sha256"), tmp)
            try:
                client.get_run(source)
            except MlflowException as exc:
                if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                    raise TrackingError(f"'{source}' is neither a models:/ URI nor a run id in {where}") from None
                raise
            if _has(client, source, STATE_PATH, MANIFEST):
                return _load_release(client, source, None, tmp)
            found = latest_checkpoint(client, source, tmp / "checkpoint")
            if found is None or "G_ema" not in found[0]:
                raise TrackingError(f"run {source} has neither a released generator nor a complete checkpoint "
                                    "with G_ema; train it longer or pass another run")
            if not _has(client, source, None, CONFIG_ARTIFACT):
                raise TrackingError(f"run {source} has no {CONFIG_ARTIFACT}; it was not started by ganray")
            config_path = Path(client.download_artifacts(source, CONFIG_ARTIFACT, str(tmp)))
            return found[0]["G_ema"], _read_config(config_path)
        except MlflowException as exc:
            raise TrackingError(f"cannot load '{source}' from {where} ({_reason(exc)})") from None
