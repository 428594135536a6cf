"""Checkpoints that can never execute code: tensor-only part files plus a sha256 manifest.

Layout of one checkpoint folder (locally and as MLflow artifacts under `checkpoints/kimg-NNNNNN/`):

    G.pt  D.pt  G_ema.pt  opt_G.pt  opt_D.pt  progress.pt  sampler.pt  rng.pt   one torch.save per part
    manifest.json   {"format": "ganray-checkpoint/1", "files": {name: {sha256, bytes}}, **meta}

The manifest is written (and uploaded) last, so a folder without it is an interrupted save and
is never loaded. Reading verifies every digest before anything is unpickled, and then loads with
`torch.load(weights_only=True)`, which refuses pickled objects outright.
"""

from __future__ import annotations

import collections
import datetime as _dt
import hashlib
import json
import logging
import os
import pickle
import re
import shutil
import threading
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ganray.models.errors import CheckpointError

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from ganray.orchestrator.tracking.run_logger import RunLogger

log = logging.getLogger("ganray.checkpoint")

FORMAT = "ganray-checkpoint/1"
MANIFEST = "manifest.json"
CHECKPOINT_ROOT = "checkpoints"
_PART_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_FOLDER = re.compile(r"kimg-(\d+)")
_SCALARS = (int, float, str, bool, type(None))
_MAPPINGS = (dict, collections.OrderedDict)
_SEQUENCES = (list, tuple)


def checkpoint_artifact_path(kimg: float) -> str:
    return f"{CHECKPOINT_ROOT}/kimg-{int(round(kimg)):06d}"


def _kimg_of(path: str) -> int:
    match = _FOLDER.fullmatch(path.rstrip("/").rsplit("/", 1)[-1])
    return int(match.group(1)) if match else -1


# ---------------------------------------------------------------------------------------------
# Contents check and snapshot


def _check(value: Any, where: str) -> None:
    """Only what `torch.load(weights_only=True)` reads back: tensors, plain scalars, containers.

    Exact types, not isinstance: numpy scalars subclass float but are pickled as numpy objects,
    which a weights-only load would then refuse, far from the code that put them there.
    """
    if isinstance(value, torch.Tensor) or type(value) in _SCALARS:
        return
    if type(value) in _MAPPINGS:
        for key, item in value.items():
            if type(key) not in (str, int):
                raise CheckpointError(f"checkpoint {where} has a key of type {type(key).__name__}; "
                                      "keys must be str or int")
            _check(item, f"{where}[{key!r}]")
        return
    if type(value) in _SEQUENCES:
        for i, item in enumerate(value):
            _check(item, f"{where}[{i}]")
        return
    raise CheckpointError(f"checkpoint {where} holds a {type(value).__module__}.{type(value).__qualname__}; "
                          "checkpoints hold tensors, numbers, strings, bools, None, dicts and lists only "
                          "(convert it, e.g. numpy arrays with torch.from_numpy)")


def _check_state(state: dict[str, Any]) -> None:
    if not state:
        raise CheckpointError("a checkpoint needs at least one part (e.g. 'G')")
    for part, value in state.items():
        if not isinstance(part, str) or not _PART_NAME.fullmatch(part) or part == Path(MANIFEST).stem:
            raise CheckpointError(f"checkpoint part name {part!r} is not a plain file name (letters, digits, _ . -)")
        _check(value, f"part '{part}'")


def snapshot_state(value: Any) -> Any:
    """A copy of `value` that later training steps cannot change: tensors detached, cloned, on CPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if type(value) in _MAPPINGS:
        copy = type(value)((key, snapshot_state(item)) for key, item in value.items())
        metadata = getattr(value, "_metadata", None)  # state_dict versions used by load_state_dict
        if metadata is not None:
            copy._metadata = metadata  # type: ignore[attr-defined]
        return copy
    if type(value) in _SEQUENCES:
        return type(value)(snapshot_state(item) for item in value)
    return value


# ---------------------------------------------------------------------------------------------
# Files


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_checkpoint(state: dict[str, Any], directory: Path, meta: dict) -> Path:
    """Write each part as `<part>.pt`, then `manifest.json` last (atomically). Returns `directory`."""
    _check_state(state)
    reserved = {"format", "files"} & set(meta)
    if reserved:
        raise CheckpointError(f"checkpoint meta may not set {sorted(reserved)} (the manifest owns them)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    manifest_path = directory / MANIFEST
    # An old manifest would vouch for a half-rewritten folder: remove it before touching parts.
    manifest_path.unlink(missing_ok=True)
    wanted = {f"{part}.pt" for part in state}
    for stale in directory.glob("*.pt"):
        if stale.name not in wanted:
            stale.unlink()
    files: dict[str, dict[str, Any]] = {}
    for part, value in state.items():
        path = directory / f"{part}.pt"
        with open(path, "wb") as fh:
            torch.save(value, fh)
            fh.flush()
            os.fsync(fh.fileno())  # parts durable before the manifest vouches for them
        files[path.name] = {"sha256": _sha256(path), "bytes": path.stat().st_size}
    body = {"format": FORMAT, "files": files, **meta}
    body.setdefault("created", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    try:
        text = json.dumps(body, indent=1, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint meta is not JSON-serialisable ({exc}); pass plain numbers and strings") from None
    tmp = directory / f".{MANIFEST}.{uuid.uuid4().hex[:8]}.tmp"
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, manifest_path)
    _fsync_dir(directory)
    return directory


def read_checkpoint(directory: Path) -> tuple[dict[str, Any], dict]:
    """Verify every digest, then load every part weights-only. Returns (state, meta)."""
    directory = Path(directory)
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"incomplete checkpoint {directory}: no {MANIFEST} (the save was interrupted "
                              "or the folder is not a checkpoint); use an earlier checkpoint")
    try:
        manifest = json.loads(manifest_path.read_text())
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise ValueError(f"format is {manifest.get('format') if isinstance(manifest, dict) else None!r}, "
                             f"expected {FORMAT!r}")
        files = manifest["files"]
        if not isinstance(files, dict) or not files:
            raise ValueError("no files listed")
    except (ValueError, KeyError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint manifest {manifest_path} is invalid ({exc}); use another checkpoint") from None
    paths: dict[str, Path] = {}
    for name, info in files.items():
        # A tampered manifest must not point outside the folder.
        if not (isinstance(name, str) and name.endswith(".pt") and _PART_NAME.fullmatch(name)):
            raise CheckpointError(f"checkpoint manifest {manifest_path} lists an invalid file name {name!r}; "
                                  "use another checkpoint")
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint {directory} lacks {name}, which its manifest lists; "
                                  "use another checkpoint")
        if (not isinstance(info, dict) or path.stat().st_size != info.get("bytes")
                or _sha256(path) != info.get("sha256")):
            raise CheckpointError(f"digest mismatch: {path} was modified or truncated; use another checkpoint")
        paths[name[:-3]] = path
    state: dict[str, Any] = {}
    for part, path in paths.items():
        try:
            state[part] = torch.load(path, weights_only=True, map_location="cpu")
        except pickle.UnpicklingError:
            raise CheckpointError(f"{path} carries a pickled object and is refused (ganray checkpoints hold "
                                  "tensors only); use a checkpoint written by ganray") from None
        except (RuntimeError, EOFError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path} cannot be read ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
                                  "use another checkpoint") from None
    meta = {k: v for k, v in manifest.items() if k not in ("format", "files")}
    return state, meta


# ---------------------------------------------------------------------------------------------
# Checkpoints as MLflow artifacts


def list_checkpoints(client: "MlflowClient", run_id: str, complete_only: bool = True) -> list[str]:
    """Artifact folders `checkpoints/kimg-NNNNNN` of a run, oldest first (with a manifest only, by default)."""
    folders = [entry.path for entry in client.list_artifacts(run_id, CHECKPOINT_ROOT)
               if entry.is_dir and _kimg_of(entry.path) >= 0]
    folders.sort(key=_kimg_of)
    if not complete_only:
        return folders
    return [folder for folder in folders if _has_manifest(client, run_id, folder)]


def _has_manifest(client: "MlflowClient", run_id: str, folder: str) -> bool:
    return any(entry.path.rsplit("/", 1)[-1] == MANIFEST for entry in client.list_artifacts(run_id, folder))


def latest_checkpoint(client: "MlflowClient", run_id: str, dest: Path) -> tuple[dict, dict] | None:
    """The run's highest-kimg checkpoint that has a manifest, downloaded to `dest` and verified."""
    complete = list_checkpoints(client, run_id)
    if not complete:
        return None
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    local = client.download_artifacts(run_id, complete[-1], str(dest))
    return read_checkpoint(Path(local))


class CheckpointManager:
    """Saves checkpoints off the training thread and keeps the last `keep` complete ones in the run."""

    def __init__(self, logger: "RunLogger", keep: int, workdir: Path, max_waiting: int = 2) -> None:
        self.logger = logger
        self.keep = max(1, int(keep))
        self.max_waiting = max(1, int(max_waiting))
        self.workdir = Path(workdir)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ganray-ckpt")
        self._lock = threading.Lock()
        self._pending: list[Future] = []
        self._uploaded: set[str] = set()
        # The run's checkpoint folders -> complete (has a manifest). Listed from the store once, at
        # the first prune (a resumed run's older saves, interrupted ones), then kept up to date
        # here: listing every folder at every save cost more background work than the save itself.
        self._folders: dict[str, bool] | None = None
        self._artifact_repo: Any = None
        self._prune_warned = False
        self.superseded = 0  # saves dropped because a newer one arrived before they started

    def save(self, state: dict[str, Any], meta: dict, kimg: float, block: bool = False) -> Future:
        """Copy `state` now; write, upload (manifest last) and prune in the background.

        The future resolves to the artifact path, or None when the upload did not complete.
        When more than `max_waiting` saves wait behind a slow upload, the oldest waiting one is
        superseded (cancelled, counted in `superseded`).
        """
        snapshot = snapshot_state(state)
        _check_state(snapshot)  # reject bad contents here, in the caller, not in the thread
        artifact_path = checkpoint_artifact_path(kimg)
        full_meta = {**meta, "kimg": float(kimg)}
        with self._lock:
            self._pending = [f for f in self._pending if not f.done()]
            waiting = [f for f in self._pending if not f.running()]
            # Bounded memory while the store is slow or away: beyond `max_waiting` snapshots the
            # oldest waiting one gives way (a newer checkpoint holds strictly more progress).
            for older in waiting[: max(0, len(waiting) + 1 - self.max_waiting)]:
                if older.cancel():
                    self.superseded += 1
                    log.warning("checkpoint superseded before upload (tracking store slow); keeping the newer "
                                "one at kimg %.1f", kimg)
            self._pending = [f for f in self._pending if not f.cancelled()]
            future = self._executor.submit(self._write_and_upload, snapshot, full_meta, artifact_path)
            self._pending.append(future)
        if block:
            future.result()
        return future

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for every pending save; False when one is still running after `timeout`."""
        with self._lock:
            pending = list(self._pending)
        for future in pending:
            try:
                future.result(timeout=timeout)
            except TimeoutError:
                return False
            except Exception:  # noqa: BLE001 - already logged by the worker
                pass
        return True

    def close(self, timeout: float | None = None) -> bool:
        done = self.wait(timeout)
        self._executor.shutdown(wait=done, cancel_futures=not done)
        return done

    # -- worker thread -------------------------------------------------------------------------

    def _write_and_upload(self, state: dict[str, Any], meta: dict, artifact_path: str) -> str | None:
        local = self.workdir / f"{artifact_path.rsplit('/', 1)[-1]}-{uuid.uuid4().hex[:8]}"
        try:
            write_checkpoint(state, local, meta)
            del state
            if artifact_path in self._uploaded:  # re-saving at the same kimg: invalidate the old one first
                self._delete(f"{artifact_path}/{MANIFEST}")
            uploads = [self.logger.log_artifact(local / f"{part}", artifact_path)
                       for part in sorted(p.name for p in local.glob("*.pt"))]
            ok = all(f.result() for f in uploads)
            # The manifest goes last, as its own call, only after every part arrived.
            ok = ok and self.logger.log_artifact(local / MANIFEST, artifact_path).result()
            if not ok:
                log.warning("checkpoint %s was not uploaded completely; it will not be used for resume",
                            artifact_path)
                if self._folders is not None:
                    self._folders[artifact_path] = False  # parts may be there: pruned once a newer one lands
                return None
            self._uploaded.add(artifact_path)
            self._prune(artifact_path)
            return artifact_path
        except Exception:
            log.exception("checkpoint %s failed", artifact_path)
            raise
        finally:
            shutil.rmtree(local, ignore_errors=True)

    def _prune(self, newest: str) -> None:
        if self._folders is None:
            client, run_id = self.logger.client, self.logger.run_id
            try:
                listed = list_checkpoints(client, run_id, complete_only=False)
                self._folders = {folder: _has_manifest(client, run_id, folder) for folder in listed}
            except Exception as exc:  # noqa: BLE001 - pruning is housekeeping, never fatal
                log.warning("could not list checkpoints of run %s for pruning: %s", run_id, _reason(exc))
                return
        self._folders[newest] = True
        ordered = sorted(self._folders, key=_kimg_of)
        complete_folders = [f for f in ordered if self._folders[f]]
        doomed = complete_folders[:-self.keep]
        newest_kimg = _kimg_of(complete_folders[-1])
        # Folders without a manifest older than the newest complete one are interrupted saves.
        doomed += [f for f in ordered if not self._folders[f] and _kimg_of(f) < newest_kimg]
        for folder in doomed:
            if not self._delete(folder):
                return
            del self._folders[folder]
            self._uploaded.discard(folder)

    def _delete(self, artifact_path: str) -> bool:
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        try:
            if self._artifact_repo is None:
                run = self.logger.client.get_run(self.logger.run_id)
                self._artifact_repo = get_artifact_repository(run.info.artifact_uri, tracking_uri=self.logger.uri)
            self._artifact_repo.delete_artifacts(artifact_path)
            return True
        except Exception as exc:  # noqa: BLE001 - unsupported stores raise all sorts
            if not self._prune_warned:
                self._prune_warned = True
                log.warning("the artifact store of run %s cannot delete %s (%s); old checkpoints are kept",
                            self.logger.run_id, artifact_path, _reason(exc))
            return False


def _reason(exc: BaseException) -> str:
    from ganray.orchestrator.tracking.store import scrub

    lines = scrub(str(exc)).strip().splitlines()
    return lines[0][:300] if lines else type(exc).__name__
