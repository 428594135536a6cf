"""Promotion by hand (`ganray promote MODEL VERSION`): move the `champion` alias, e.g. to roll back."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Optional

from ganray.models.errors import ConfigError
from ganray.orchestrator.errors import TrackingError
from ganray.orchestrator.retrain.champion import CHAMPION, first_line
from ganray.orchestrator.retrain.lock import current_user

log = logging.getLogger("ganray.retrain")


@dataclass
class PromoteOutcome:
    model_name: str
    version: str
    previous: Optional[str]
    user: str


def promote(model_name: str, version: str, reason: Optional[str] = None,
            tracking_uri: Optional[str] = None, trust_code: bool = False) -> PromoteOutcome:
    """Move `champion` to `version` (a rollback), recording who asked, when and why on the version.

    The version's release is verified first (state and config digests), and a config that
    imports code needs `trust_code`: every later retrain loads the champion unattended.

    It does not take the retrain lock: a rollback must work while a retrain runs (that retrain may
    still promote its own challenger when it ends, as its gate decides).
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from ganray.orchestrator.tracking import store as tracking
    from ganray.orchestrator.tracking.released_model import (_no_versions_error, _version_numbers, load_release,
                                                             registered_model)

    version = str(version).strip()
    if not version.isdigit():
        raise ConfigError(f"model version '{version}' is not a number; pass e.g. `ganray promote {model_name} 3`")
    uri = tracking.resolve_tracking_uri(tracking_uri, None)
    client = MlflowClient(uri)
    where = tracking.redact(uri)
    model = registered_model(client, model_name, where)
    try:
        client.get_model_version(model_name, version)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            numbers = _version_numbers(client, model_name)
            if not numbers:
                raise _no_versions_error(model_name, where) from None
            raise TrackingError(f"registered model '{model_name}' has no version {version} in {where}; its versions "
                                f"are {', '.join(map(str, numbers))}: pass one of them, e.g. "
                                f"`ganray promote {model_name} {numbers[-1]}`") from None
        raise TrackingError(f"cannot read version {version} of '{model_name}' ({first_line(exc)})") from None
    load_release(client, f"models:/{model_name}/{version}", trust_code=trust_code)
    previous = (model.aliases or {}).get(CHAMPION)
    user = current_user()
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    tags = {"ganray.promoted_by": user, "ganray.promoted_at": now,
            "ganray.promote_reason": tracking.scrub(reason or "manual promotion"),
            "ganray.promoted_from": str(previous) if previous is not None else "none"}
    for key, value in tags.items():
        client.set_model_version_tag(model_name, version, key, value)
    client.set_registered_model_alias(model_name, CHAMPION, version)
    if previous is not None and str(previous) != version:
        client.set_model_version_tag(model_name, str(previous), "ganray.demoted_at", now)
        client.set_model_version_tag(model_name, str(previous), "ganray.demoted_by", user)
    log.info("'%s' champion: version %s (was %s), by %s", model_name, version, previous, user)
    return PromoteOutcome(model_name=model_name, version=version,
                          previous=str(previous) if previous is not None else None, user=user)
