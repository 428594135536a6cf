"""The search file of `ganray tune`: its pydantic model, its checks, and its Tune translation.

A search file names the scheduler, the metric and its mode, the trial count, the concurrency,
where Tune keeps its results, and the search space over dotted config keys:

    scheduler: {kind: pbt, perturbation_interval: 2}
    metric: eval/kl
    mode: min
    num_samples: 4
    space:
      schedule.g_lr: {loguniform: [1.0e-4, 2.0e-3]}
      schedule.betas: {choice: [[0.5, 0.99], [0.0, 0.99]]}

Everything here runs in the driver before any trial starts, so every mistake in the file is a
`ConfigError` naming the key, never a failed trial minutes later.
"""

from __future__ import annotations

import copy
import difflib
import math
import re
from pathlib import Path
from typing import Any, Literal, Optional, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ganray.models.errors import ConfigError
from ganray.orchestrator.job.config import TrainConfig, config_from_dict, read_yaml_file
from ganray.orchestrator.job.evaluate import MIXTURES, STACKED, default_metrics

# Keys PBT may change in a running trial: the engine re-applies them to the restored optimizers
# and schedule (`Engine.set_hyper`). Everything else shapes the networks or the data and is only
# sampled when a trial starts.
MUTABLE_KEYS = {"schedule.g_lr": "g_lr", "schedule.d_lr": "d_lr", "schedule.betas": "betas",
                "schedule.n_critic": "n_critic", "loss.r1_gamma": "r1_gamma", "loss.r2_gamma": "r2_gamma"}
# Lower is better for these eval metrics, higher for the rest (used when `mode` is omitted).
_LOWER_IS_BETTER = ("kl", "fid", "kid", "kid_std", "kid_class_mean")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Distribution(_Strict):
    """One key's values: exactly one of Tune's distributions."""

    uniform: Optional[tuple[float, float]] = None
    loguniform: Optional[tuple[float, float]] = None
    choice: Optional[list[Any]] = None
    grid: Optional[list[Any]] = None

    @model_validator(mode="after")
    def _one(self) -> "Distribution":
        given = [k for k in ("uniform", "loguniform", "choice", "grid") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of uniform: [lo, hi], loguniform: [lo, hi], choice: [...], "
                             f"grid: [...] (got {', '.join(given) or 'none'})")
        kind = given[0]
        if kind in ("uniform", "loguniform"):
            lo, hi = getattr(self, kind)
            if not lo < hi:
                raise ValueError(f"{kind}: [lo, hi] needs lo < hi (got [{lo:g}, {hi:g}])")
            if kind == "loguniform" and lo <= 0:
                raise ValueError(f"loguniform: [lo, hi] needs lo > 0 (got {lo:g})")
        elif not getattr(self, kind):
            raise ValueError(f"{kind}: needs at least one value")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("uniform", "loguniform", "choice", "grid") if getattr(self, k) is not None)

    @property
    def bounds(self) -> Optional[tuple[float, float]]:
        return getattr(self, self.kind) if self.kind in ("uniform", "loguniform") else None

    def probes(self) -> list[Any]:
        """Values that stand for the whole distribution when checking it against the config."""
        if self.bounds is not None:
            # The ends and a value between them (not a round number: an int key must refuse ranges).
            lo, hi = self.bounds
            inner = lo * (hi / lo) ** 0.37 if self.kind == "loguniform" else lo + 0.37 * (hi - lo)
            return [lo, hi, inner]
        return list(getattr(self, self.kind))

    def tune_domain(self) -> Any:
        from ray import tune

        if self.kind == "uniform":
            return tune.uniform(*self.uniform)  # type: ignore[misc]
        if self.kind == "loguniform":
            return tune.loguniform(*self.loguniform)  # type: ignore[misc]
        if self.kind == "choice":
            return tune.choice(self.choice)
        return tune.grid_search(self.grid)

    def mutation(self) -> Any:
        """PBT's `hyperparam_mutations` entry: a Domain for ranges, the value list otherwise."""
        if self.bounds is not None:
            return self.tune_domain()
        return list(getattr(self, self.kind))


class SchedulerSpec(_Strict):
    kind: Literal["pbt", "asha", "fifo"] = "fifo"
    # pbt (intervals count eval reports, i.e. Tune's training_iteration)
    perturbation_interval: Optional[int] = Field(None, ge=1)
    quantile_fraction: Optional[float] = Field(None, ge=0.0, le=0.5)
    resample_probability: Optional[float] = Field(None, ge=0.0, le=1.0)
    synch: Optional[bool] = Field(None, description="pbt: rank all trials together at each perturbation point")
    # asha
    grace_period: Optional[int] = Field(None, ge=1)
    reduction_factor: Optional[float] = Field(None, gt=1.0)
    max_t: Optional[int] = Field(None, ge=1)

    @model_validator(mode="after")
    def _options_belong(self) -> "SchedulerSpec":
        owners = {"perturbation_interval": "pbt", "quantile_fraction": "pbt", "resample_probability": "pbt",
                  "synch": "pbt", "grace_period": "asha", "reduction_factor": "asha", "max_t": "asha"}
        for key, owner in owners.items():
            if getattr(self, key) is not None and owner != self.kind:
                raise ValueError(f"scheduler.{key} belongs to scheduler kind '{owner}', not '{self.kind}'; "
                                 "remove it or change scheduler.kind")
        return self


class SearchSpec(_Strict):
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)
    metric: str = Field(..., description="an eval metric the job reports, e.g. eval/kl or eval/fid")
    mode: Optional[Literal["min", "max"]] = Field(None, description="default: min for kl/fid/kid, else max")
    num_samples: int = Field(1, ge=1, le=100_000, description="trials (times each grid point)")
    max_concurrent_trials: Optional[int] = Field(None, ge=1)
    storage_path: Optional[str] = Field(None, description="Tune results; default ./ray_results")
    name: Optional[str] = Field(None, description="experiment name under storage_path (default: the file's stem)")
    keep_checkpoints: int = Field(3, ge=1, le=1000, description="Tune checkpoints kept per trial")
    seed: Optional[int] = Field(None, ge=0, description="seed of Tune's random sampling")
    space: dict[str, Distribution] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> "SearchSpec":
        if self.name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.name):
            raise ValueError(f"name '{self.name}' must be a plain folder name (letters, digits, . _ -)")
        if self.scheduler.kind == "pbt":
            mutable = [k for k in self.space if k in MUTABLE_KEYS]
            if not mutable:
                raise ValueError("scheduler kind 'pbt' needs at least one key in space that it can mutate "
                                 f"during training: {', '.join(MUTABLE_KEYS)}")
        return self

    @property
    def resolved_mode(self) -> str:
        if self.mode is not None:
            return self.mode
        return "min" if self.metric.split("/")[-1] in _LOWER_IS_BETTER else "max"


# ---------------------------------------------------------------------------------------------
# Loading


def _format(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = [str(p) for p in first.get("loc", ())]
    where = ".".join(loc) or "the search file"
    if first.get("type") == "extra_forbidden":
        parent = loc[:-1]
        names = {(): SearchSpec, ("scheduler",): SchedulerSpec}.get(tuple(parent))
        if names is None and len(parent) == 2 and parent[0] == "space":
            names = Distribution
        hint = difflib.get_close_matches(loc[-1], list(names.model_fields) if names else [], n=1, cutoff=0.5)
        if names is Distribution and "." not in parent[1]:
            return (f"space.{parent[1]}: space keys are dotted config keys with one distribution each, "
                    f"e.g. '{parent[1]}.{loc[-1]}: {{loguniform: [1.0e-4, 1.0e-3]}}'")
        return (f"unknown key '{where}' in the search file"
                + (f"; did you mean '{'.'.join([*parent, hint[0]])}'?" if hint else "; remove it"))
    if first.get("type") == "literal_error":
        return f"{where} must be one of {(first.get('ctx') or {}).get('expected')} (got {first.get('input')!r})"
    if first.get("type") == "value_error":
        text = str((first.get("ctx") or {}).get("error", first.get("msg")))
        return text if not loc or text.startswith(f"{loc[0]}.") else f"{where}: {text}"
    if len(loc) == 2 and loc[0] == "space" and first.get("type") in ("model_type", "dict_type"):
        return (f"{where} must be one distribution: {{uniform: [lo, hi]}}, {{loguniform: [lo, hi]}}, "
                f"{{choice: [...]}} or {{grid: [...]}} (got {first.get('input')!r})")
    if first.get("type") == "missing":
        return f"{where} is required in the search file"
    return f"{where}: {first.get('msg', 'invalid value').lower()} (got {first.get('input')!r})"


def parse_search(tree: Any, default_name: str = "ganray-search") -> SearchSpec:
    """A search spec from a YAML mapping; every problem is a one-line ConfigError."""
    if not isinstance(tree, dict):
        raise ConfigError(f"the search file must be a YAML mapping (scheduler, metric, space, ...), "
                          f"not a {type(tree).__name__}")
    try:
        spec = SearchSpec.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format(err)) from None
    if spec.name is None:
        spec = spec.model_copy(update={"name": default_name})
    return spec


def load_search(path: Union[str, Path]) -> SearchSpec:
    p = Path(path)
    tree = read_yaml_file(p, "search", "configs/search-grid25-pbt.yaml")
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", p.stem).strip("-._") or "ganray-search"
    return parse_search(tree, default_name=name)


# ---------------------------------------------------------------------------------------------
# Checks against the job config


def plain(value: Any) -> Any:
    """Tune hands out numpy scalars; pydantic, JSON and MLflow want plain Python values."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple, np.ndarray)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    """tree[a][b][c] = value for key 'a.b.c' (missing sections created; pydantic judges the key)."""
    parts = key.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"search space key '{key}': '{'.'.join(parts[:i + 1])}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def trial_config(base: Union[TrainConfig, dict[str, Any]], sampled: dict[str, Any]) -> TrainConfig:
    """The base config with a trial's sampled dotted keys applied."""
    tree = base.model_dump(mode="json") if isinstance(base, TrainConfig) else copy.deepcopy(base)
    for key, value in sampled.items():
        set_dotted(tree, key, plain(value))
    return config_from_dict(tree)


def absolute_paths(config: TrainConfig) -> TrainConfig:
    """Relative local paths (data, Inception weights) made absolute against the driver's cwd:
    Tune runs each trial in its own working directory, where they would point nowhere."""
    tree = config.model_dump(mode="json")
    for section, key in (("data", "path"), ("eval", "inception_weights")):
        value = tree[section].get(key)
        if isinstance(value, str) and value and "://" not in value and not Path(value).expanduser().is_absolute():
            tree[section][key] = str(Path(value).expanduser().resolve())
    return config_from_dict(tree)


def hyper_of(config: TrainConfig) -> dict[str, Any]:
    """The engine hyperparameters (`Engine.set_hyper` keys) a config asks for."""
    s = config.schedule
    return {"g_lr": s.g_lr, "d_lr": s.d_lr, "betas": [float(b) for b in s.betas],
            "n_critic": s.n_critic, "r1_gamma": config.loss.r1_gamma, "r2_gamma": config.loss.r2_gamma}


def reported_eval_metrics(config: TrainConfig) -> list[str]:
    """The `eval/<name>` keys a trial of this job reports (mirrors `Evaluator` without loading data)."""
    wanted = [m for m in config.eval.metrics if m != "auto"]
    if config.data.name in MIXTURES:
        return [f"eval/{m}" for m in (wanted or default_metrics(config.data.name, "2d"))]
    if config.data.name == STACKED:
        return [f"eval/{m}" for m in (wanted or default_metrics(config.data.name, "image"))]
    if config.data.name != "digits" and not config.eval.inception_weights:
        return []  # images without a feature network: the evaluator skips FID/KID
    names = wanted or ["fid", "kid"]
    extra = ["kid_std", *(f"{m}_floor" for m in names if config.data.name == "digits")]
    if config.data.name == "digits":
        extra.append("classifier_acc")
    if config.model.conditional:  # orchestrator/job/class_scores.py
        extra.append("kid_class_mean")
        if config.data.name == "digits":
            extra += ["class_acc", "class_acc_min", "class_acc_real"]
    return [f"eval/{m}" for m in [*names, *extra]]


def check_search(spec: SearchSpec, base: TrainConfig) -> None:
    """Every space key is a config key taking every probed value; the metric is one the job reports."""
    tree = base.model_dump(mode="json")
    for key, dist in spec.space.items():
        for value in dist.probes():
            probe = copy.deepcopy(tree)
            set_dotted(probe, key, plain(value))
            try:
                config_from_dict(probe)
            except ConfigError as err:
                raise ConfigError(f"search space key '{key}' (value {value!r}): {err}") from None
    joint = copy.deepcopy(tree)
    for key, dist in spec.space.items():
        set_dotted(joint, key, plain(dist.probes()[0]))
    try:
        config_from_dict(joint)
    except ConfigError as err:
        raise ConfigError(f"the search space's first values together do not make a valid config: {err}") from None
    reported = reported_eval_metrics(base)
    if spec.metric not in reported:
        if not reported:
            raise ConfigError(f"metric '{spec.metric}': this job reports no eval metrics (data '{base.data.name}' "
                              "has no FID feature network); set eval.inception_weights")
        hint = difflib.get_close_matches(spec.metric, reported, n=1, cutoff=0.8)
        raise ConfigError(f"metric '{spec.metric}' is not reported by this job (data '{base.data.name}' reports "
                          f"{', '.join(reported)})" + (f"; did you mean '{hint[0]}'?" if hint else ""))
    if base.eval.every_kimg > base.schedule.total_kimg:
        raise ConfigError(f"eval.every_kimg ({base.eval.every_kimg:g}) exceeds schedule.total_kimg "
                          f"({base.schedule.total_kimg:g}): a trial would report once at most; lower eval.every_kimg")


def iterations(config: TrainConfig) -> int:
    """Reports (Tune iterations) a full trial makes: one per eval interval."""
    return max(1, math.ceil(config.schedule.total_kimg / config.eval.every_kimg - 1e-9))


def is_local_path(storage: str) -> bool:
    """A path on this machine's file system (as opposed to a cloud URI such as s3://)."""
    return "://" not in storage or storage.startswith("file://")


# File systems every node of a cluster can mount: a path on one of them counts as shared storage.
_SHARED_FS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "ceph", "glusterfs", "gpfs", "beegfs",
              "fuse.s3fs", "fuse.gcsfuse", "fuse.juicefs", "fuse.sshfs", "9p", "virtiofs", "efs")


def mount_fstype(path: str, mounts_file: str = "/proc/mounts") -> Optional[str]:
    """The file system type of the mount holding `path` (None where /proc/mounts is unreadable)."""
    try:
        lines = Path(mounts_file).read_text().splitlines()
    except OSError:
        return None
    target = Path(path).resolve()
    best: tuple[int, Optional[str]] = (-1, None)
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        if target == Path(point) or Path(point) in target.parents:
            if len(point) > best[0]:
                best = (len(point), fields[2])
    return best[1]


def check_storage(storage: str, alive_nodes: int, fstype: Optional[str] = None) -> None:
    """On a multi-node cluster Tune's storage must be reachable from every node."""
    if alive_nodes <= 1 or not is_local_path(storage):
        return
    path = storage[len("file://"):] if storage.startswith("file://") else storage
    kind = fstype if fstype is not None else mount_fstype(path)
    if kind is not None and (kind in _SHARED_FS or kind.startswith("fuse.")):
        return
    raise ConfigError(f"storage_path '{storage}' is a local path ({kind or 'unknown'} file system) but the Ray "
                      f"cluster has {alive_nodes} nodes, whose trials cannot write there; set storage_path in the "
                      "search file to shared storage mounted on every node (NFS) or a cloud URI (s3://, gs://)")


def resolve_storage(storage: Optional[str]) -> str:
    """An absolute local path (Tune needs one) or a URI as given."""
    storage = storage or "./ray_results"
    if storage.startswith("file://"):
        return str(Path(storage[len("file://"):]).expanduser().resolve())
    if "://" in storage:
        return storage
    return str(Path(storage).expanduser().resolve())


# ---------------------------------------------------------------------------------------------
# Tune objects


class ClipToSpace:
    """PBT's explore multiplies by 0.8/1.2 and may leave the declared range: clip back into it.

    A class, not a closure, so Tune can pickle the scheduler with the experiment state."""

    def __init__(self, bounds: dict[str, tuple[float, float]]) -> None:
        self.bounds = bounds

    def __call__(self, config: dict[str, Any]) -> dict[str, Any]:
        for key, (lo, hi) in self.bounds.items():
            if key in config:
                config[key] = min(max(float(config[key]), lo), hi)
        return config


def param_space(spec: SearchSpec) -> dict[str, Any]:
    return {key: dist.tune_domain() for key, dist in spec.space.items()}


def make_scheduler(spec: SearchSpec, config: TrainConfig) -> Any:
    """The Tune scheduler the spec names; metric and mode go to TuneConfig (never both places)."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    sched = spec.scheduler
    if sched.kind == "pbt":
        mutable = {k: d for k, d in spec.space.items() if k in MUTABLE_KEYS}
        return PopulationBasedTraining(
            time_attr="training_iteration",
            perturbation_interval=sched.perturbation_interval or 2,
            quantile_fraction=0.25 if sched.quantile_fraction is None else sched.quantile_fraction,
            resample_probability=0.25 if sched.resample_probability is None else sched.resample_probability,
            # Asynchronous PBT ranks a trial against the others' last scores, which favours whoever
            # reported last while the metric still improves; synch ranks everyone at the same point.
            synch=bool(sched.synch),
            hyperparam_mutations={k: d.mutation() for k, d in mutable.items()},
            custom_explore_fn=ClipToSpace({k: d.bounds for k, d in mutable.items() if d.bounds is not None}))
    if sched.kind == "asha":
        max_t = sched.max_t or iterations(config)
        grace = min(sched.grace_period or 1, max_t)
        return ASHAScheduler(time_attr="training_iteration", max_t=max_t, grace_period=grace,
                             reduction_factor=sched.reduction_factor or 2)
    return FIFOScheduler()
