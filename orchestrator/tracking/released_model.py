"""Reading a released generator back: `models:/NAME/VERSION`, `models:/NAME@ALIAS` or a run id.

What `ganray sample` / `evaluate`, retrain's gate and `load_generator` use. The state is loaded
weights-only after its digest matches; the config is code (`orchestrator/job/trust.py`), so a
registered version's `release/config.yaml` must match the version's `ganray.config_sha256` tag,
and a config that names import paths is refused unless the caller trusts it. Nothing is built
(no import, no data read) before both checks pass; the sample shape comes from the manifest,
so sampling never reads the training data.
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch
import yaml

from ganray.orchestrator.errors import TrackingError
from ganray.orchestrator.job.checkpoint import MANIFEST, latest_checkpoint, read_checkpoint
from ganray.orchestrator.job.config import TrainConfig, config_from_dict
from ganray.orchestrator.job.trust import check_imports
from ganray.orchestrator.tracking.release import RELEASE_CONFIG, RELEASE_DIR, STATE_PATH, _reason
from ganray.orchestrator.tracking.store import CONFIG_ARTIFACT, redact

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion
    from torch import nn

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


@dataclass
class ReleasedGenerator:
    """A generator's digest-checked EMA state with the (checked) config and sample shape it needs."""

    state: dict[str, torch.Tensor]
    config: TrainConfig
    sample_shape: Optional[tuple[int, ...]]  # None: a checkpoint older than ganray's recording it
    source: str  # for messages: "model 'x' version 3" or "run <id>"

    def build(self) -> "nn.Module":
        """The CPU generator (imports only what the checked config names)."""
        from ganray.orchestrator.job.engine import build_eval_generator

        shape = self.sample_shape
        if shape is None:  # only for old checkpoints: the data's shape, read from its test split
            from ganray.workers.data import load_dataset

            shape = tuple(load_dataset(self.config.data.model_dump(), self.config.seed, "test").sample_shape)
        return build_eval_generator(self.config, shape, self.state)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _read_config(path: Path, source: str, expected_sha256: Optional[str]) -> TrainConfig:
    if expected_sha256 is not None and _sha256(path) != expected_sha256:
        raise TrackingError(f"the config of {source} does not match the digest it was released with (changed after "
                            "the release?); release the generator again from a run you trust")
    return config_from_dict(yaml.safe_load(path.read_text()))


def _shape(meta: dict) -> Optional[tuple[int, ...]]:
    shape = meta.get("sample_shape")
    return tuple(int(s) for s in shape) if shape else None


def _load_release(client: "MlflowClient", run_id: str, source: str, pins: Optional[dict[str, str]],
                  tmp: Path) -> ReleasedGenerator:
    """The release folder of `run_id`; `pins` (a model version's tags) fix both digests."""
    local = Path(client.download_artifacts(run_id, RELEASE_DIR, str(tmp)))
    manifest = json.loads((local / "state" / MANIFEST).read_text())
    if pins is not None:
        found = manifest.get("files", {}).get("G_ema.pt", {}).get("sha256")
        if found != pins.get("ganray.state_sha256"):
            raise TrackingError(f"the released state of {source} in run {run_id} is not the one this model version was "
                                "registered with (released again from the same run?); use the newest version")
        if not pins.get("ganray.config_sha256"):
            raise TrackingError(f"{source} was released without a config digest (by an older ganray), so its config "
                                "cannot be verified; release it again (ganray train --resume RUN with "
                                "tracking.model_name set)")
        config_pin: Optional[str] = pins["ganray.config_sha256"]
    else:  # a run id: its manifest's digest catches a damaged file, not a deliberate change
        config_pin = manifest.get("config_sha256")
    config = _read_config(local / RELEASE_CONFIG, source, config_pin)
    state, meta = read_checkpoint(local / "state")
    if "G_ema" not in state:
        raise TrackingError(f"the released state of {source} has no G_ema part")
    return ReleasedGenerator(state["G_ema"], config, _shape(meta), source)


def _load_from_run(client: "MlflowClient", run_id: str, tmp: Path) -> ReleasedGenerator:
    """A run without a release: its newest complete checkpoint and the config it logged."""
    source = f"run {run_id}"
    if _has(client, run_id, STATE_PATH, MANIFEST):
        return _load_release(client, run_id, source, None, tmp)
    found = latest_checkpoint(client, run_id, tmp / "checkpoint")
    if found is None or "G_ema" not in found[0]:
        raise TrackingError(f"run {run_id} has neither a released generator nor a complete checkpoint "
                            "with G_ema; train it longer or pass another run")
    if not _has(client, run_id, None, CONFIG_ARTIFACT):
        raise TrackingError(f"run {run_id} has no {CONFIG_ARTIFACT}; it was not started by ganray")
    config_path = Path(client.download_artifacts(run_id, CONFIG_ARTIFACT, str(tmp)))
    return ReleasedGenerator(found[0]["G_ema"], _read_config(config_path, source, None), _shape(found[1]), source)


def load_release(client: "MlflowClient", model_uri_or_run_id: str, trust_code: bool = False,
                 trusted_config: Optional[TrainConfig] = None) -> ReleasedGenerator:
    """The generator of a registered version, or of a run (its release, else its newest checkpoint).

    Everything is digest-checked and loaded weights-only (the exported, pickled model is never
    used); a config naming import paths nobody vouched for is refused (see `trust.check_imports`:
    `trust_code`, or the same paths in `trusted_config`, the caller's own config).
    """
    from mlflow.exceptions import MlflowException

    source = model_uri_or_run_id.strip()
    where = redact(client.tracking_uri)
    with tempfile.TemporaryDirectory(prefix="ganray-load-") as tmp_name:
        tmp = Path(tmp_name)
        try:
            if source.startswith("models:/"):
                mv = _model_version(source, client)
                what = f"model '{mv.name}' version {mv.version}"
                if not mv.run_id:
                    raise TrackingError(f"{what} has no source run")
                if not _has(client, mv.run_id, STATE_PATH, MANIFEST):
                    raise TrackingError(f"{what} has no ganray state in run {mv.run_id}; it was not released by ganray")
                loaded = _load_release(client, mv.run_id, what, dict(mv.tags or {}), tmp)
            else:
                try:
                    client.get_run(source)
                except MlflowException as exc:
                    if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                        raise TrackingError(f"'{source}' is neither a models:/ URI nor a run id in {where}") from None
                    raise
                loaded = _load_from_run(client, source, tmp)
        except MlflowException as exc:
            raise TrackingError(f"cannot load '{source}' from {where} ({_reason(exc)})") from None
    check_imports(loaded.config, loaded.source, trust_code, trusted_config)
    return loaded


def load_generator(model_uri_or_run_id: str, tracking_uri: Optional[str] = None,
                   trust_code: bool = False) -> tuple["nn.Module", TrainConfig]:
    """(EMA generator on CPU in eval mode, its config): the Python side of `ganray sample`.

    `trust_code=True` allows a config that names import paths (see `orchestrator/job/trust.py`).
    """
    from mlflow import MlflowClient

    from ganray.orchestrator.tracking import store

    uri = store.resolve_tracking_uri(tracking_uri, None)
    store.prepare_store(uri, None)
    loaded = load_release(MlflowClient(uri), model_uri_or_run_id, trust_code=trust_code)
    return loaded.build(), loaded.config
