"""The retrain lock of a registered model: one retrain of NAME at a time, across machines.

MLflow has no atomic test-and-set on tags, but creating a registered model is atomic: the store
refuses a second model of the same name (a unique key in SQL stores, the same check behind the
REST API). So the lock *is* a registered model `NAME.retrain-lock` whose tags say who holds it
(`holder`, `token`) and until when (`acquired_at`, `expires_at`, ISO 8601 UTC).

A crashed holder must not block forever: a lock past `expires_at` is broken (re-read, re-check the
expiry and the token, delete, create anew). A live holder refreshes `expires_at` from a heartbeat
thread, so a retrain longer than the TTL keeps its lock while a dead one loses it within one TTL.
Because deleting and re-creating is not one atomic step, two processes breaking the same stale
lock at the same instant could both believe they won; the holder therefore re-checks its token
right after acquiring and before every alias change (`verify`), which turns that race into a clean
`LockHeldError` for one of them instead of two promotions.
"""

from __future__ import annotations

import getpass
import logging
import os
import socket
import threading
import uuid
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Optional

from ganray.orchestrator.errors import LockHeldError, TrackingError

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger("ganray.retrain")

LOCK_SUFFIX = ".retrain-lock"
TAG_HOLDER, TAG_TOKEN = "holder", "token"
TAG_ACQUIRED, TAG_EXPIRES = "acquired_at", "expires_at"


def lock_name(model_name: str) -> str:
    return f"{model_name}{LOCK_SUFFIX}"


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _iso(t: datetime) -> str:
    return t.astimezone(timezone.utc).isoformat(timespec="seconds")


def _parse(text: Optional[str]) -> Optional[datetime]:
    if not text:
        return None
    try:
        t = datetime.fromisoformat(text)
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def current_user() -> str:
    """Who runs this process (for lock holders and promotion records)."""
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - getpass raises OSError/KeyError without a passwd entry
        return os.environ.get("USER") or os.environ.get("USERNAME") or "unknown"


def holder_id() -> str:
    return f"{current_user()}@{socket.gethostname()}:{os.getpid()}"


class RetrainLock:
    """`with RetrainLock(client, name, ttl_s): ...` holds `NAME.retrain-lock` for the block."""

    def __init__(self, client: "MlflowClient", model_name: str, ttl_s: float,
                 heartbeat_s: Optional[float] = None) -> None:
        self.client = client
        self.model_name = model_name
        self.name = lock_name(model_name)
        self.ttl_s = float(ttl_s)
        # Refresh well before expiry, so one slow store call cannot let the lock lapse.
        self.heartbeat_s = heartbeat_s if heartbeat_s is not None else max(1.0, self.ttl_s / 3.0)
        self.token = uuid.uuid4().hex
        self.held = False
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    # -- acquiring -----------------------------------------------------------------------------
    def acquire(self) -> None:
        """Take the lock or raise `LockHeldError` naming the holder and the expiry."""
        if self._create():
            self._after_acquire()
            return
        tags = self._read_tags()
        if tags is None:  # released between our create and our read: one more try
            if self._create():
                self._after_acquire()
                return
            tags = self._read_tags() or {}
        expires = _parse(tags.get(TAG_EXPIRES))
        if expires is not None and expires > _now():
            raise self._held_error(tags)
        self._break(tags)
        if not self._create():
            raise self._held_error(self._read_tags() or {})
        log.warning("broke the expired retrain lock of '%s' (held by %s, expired %s)", self.model_name,
                    tags.get(TAG_HOLDER, "unknown"), tags.get(TAG_EXPIRES, "unknown"))
        self._after_acquire()

    def _create(self) -> bool:
        from mlflow.exceptions import MlflowException

        now = _now()
        tags = {TAG_HOLDER: holder_id(), TAG_TOKEN: self.token, TAG_ACQUIRED: _iso(now),
                TAG_EXPIRES: _iso(now + timedelta(seconds=self.ttl_s))}
        try:
            self.client.create_registered_model(
                self.name, tags=tags,
                description=f"lock: a `ganray retrain` of '{self.model_name}' is running (see tags); "
                            "deleted when it ends, broken by the next retrain once expired")
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_ALREADY_EXISTS":
                return False
            raise TrackingError(f"cannot create the retrain lock '{self.name}' ({_first_line(exc)})") from None
        return True

    def _read_tags(self) -> Optional[dict[str, str]]:
        from mlflow.exceptions import MlflowException

        try:
            return dict(self.client.get_registered_model(self.name).tags)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise TrackingError(f"cannot read the retrain lock '{self.name}' ({_first_line(exc)})") from None

    def _break(self, seen: dict[str, str]) -> None:
        """Delete a stale lock, but only the very lock we judged stale (same token, still expired)."""
        from mlflow.exceptions import MlflowException

        again = self._read_tags()
        if again is None:
            return  # its holder released it meanwhile
        expires = _parse(again.get(TAG_EXPIRES))
        if again.get(TAG_TOKEN) != seen.get(TAG_TOKEN) or (expires is not None and expires > _now()):
            raise self._held_error(again)  # someone else broke it and holds a fresh one, or it was refreshed
        try:
            self.client.delete_registered_model(self.name)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise TrackingError(f"cannot break the expired retrain lock '{self.name}' ({_first_line(exc)})") from None

    def _after_acquire(self) -> None:
        self.held = True
        self.verify()
        self._thread = threading.Thread(target=self._heartbeat, name=f"retrain-lock-{self.model_name}", daemon=True)
        self._thread.start()

    def _held_error(self, tags: dict[str, str]) -> LockHeldError:
        return LockHeldError(
            f"another retrain of '{self.model_name}' holds the lock '{self.name}' (holder "
            f"{tags.get(TAG_HOLDER, 'unknown')}, acquired {tags.get(TAG_ACQUIRED, 'unknown')}, expires "
            f"{tags.get(TAG_EXPIRES, 'unknown')}); wait for it to finish, or delete that registered model "
            "if the holder is gone")

    # -- holding -------------------------------------------------------------------------------
    def verify(self) -> None:
        """Raise `LockHeldError` unless the lock in the store is still ours."""
        tags = self._read_tags()
        if tags is None or tags.get(TAG_TOKEN) != self.token:
            self.held = False
            raise LockHeldError(f"the retrain lock '{self.name}' was broken or taken over by "
                                f"{(tags or {}).get(TAG_HOLDER, 'nobody')} while this retrain ran "
                                "(it outlived retrain.lock_ttl_s without a heartbeat); nothing was promoted")

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                tags = self._read_tags()
                if tags is None or tags.get(TAG_TOKEN) != self.token:
                    log.warning("the retrain lock '%s' is no longer ours; stopping its heartbeat", self.name)
                    return
                self.client.set_registered_model_tag(
                    self.name, TAG_EXPIRES, _iso(_now() + timedelta(seconds=self.ttl_s)))
            except Exception as exc:  # noqa: BLE001 - a missed beat only shortens the lease
                log.warning("could not refresh the retrain lock '%s': %s", self.name, _first_line(exc))

    # -- releasing -----------------------------------------------------------------------------
    def release(self) -> None:
        """Delete the lock if it is still ours (never someone else's)."""
        from mlflow.exceptions import MlflowException

        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10.0)
        if not self.held:
            return
        self.held = False
        try:
            tags = self._read_tags()
            if tags is not None and tags.get(TAG_TOKEN) == self.token:
                self.client.delete_registered_model(self.name)
        except (MlflowException, TrackingError) as exc:
            log.warning("could not release the retrain lock '%s' (%s); it expires by itself at its "
                        "expires_at tag", self.name, _first_line(exc))

    def __enter__(self) -> "RetrainLock":
        self.acquire()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def _first_line(exc: BaseException) -> str:
    from ganray.orchestrator.tracking.store import scrub

    lines = scrub(str(exc)).strip().splitlines()
    return lines[0][:300] if lines else type(exc).__name__
