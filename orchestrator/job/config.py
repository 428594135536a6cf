"""The job config: a pydantic model tree loaded from YAML with `--set dotted.key=value` overrides.

Section names (`seed`, `data`, `model`, `loss`, `schedule`, `topology`, `resources`, `tracking`,
`eval`, `fault`, `retrain`, `augment`) and the keys named in the README are part of the CLI contract.
Every error is a `ConfigError` with one line naming the field and what it accepts.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from ganray.models.errors import ConfigError
from ganray.orchestrator.job.config_text import (apply_overrides, flatten, format_validation_error, parse_override,
                                                 read_yaml_file)
from ganray.orchestrator.job.layout import KEY_OWNER, Layout, resolve_layout
from ganray.orchestrator.job.learner_keys import unread_keys

log = logging.getLogger("ganray")


class _Section(BaseModel):
    # Unknown keys are errors (with a "did you mean" hint added by `config_text.format_validation_error`).
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    name: str = Field("grid25", description="ring8 | grid25 | digits | stacked-digits | imagefolder | parquet | "
                      "random_images | torchvision:<Dataset> | an import path 'pkg.mod:loader'")
    path: Optional[str] = Field(None, description="root folder or URI for imagefolder/parquet/torchvision")
    size: int = Field(100_000, ge=16, le=100_000_000,
                      description="samples drawn once from a synthetic set (2D mixture, random_images; "
                      "stacked-digits: triples per split)")
    resolution: Optional[int] = Field(None, description="image side for imagefolder/parquet/torchvision (8, 16, 32, 64)")
    channels: Optional[int] = Field(None, ge=1, le=4, description="image channels (1 or 3)")
    column: Optional[str] = Field(None, description="parquet column holding encoded images or arrays")
    label_column: Optional[str] = Field(None, description=(
        "parquet column of integer class labels 0..model.num_classes-1 (conditional training)"))
    skip_corrupt: bool = Field(False, description="skip and count corrupt files instead of failing")
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="held-out fraction for evaluation")

    @model_validator(mode="after")
    def _check_resolution(self) -> "DataConfig":
        if self.resolution is not None and self.resolution not in (8, 16, 32, 64):
            raise ValueError(f"data.resolution must be one of 8, 16, 32, 64 (got {self.resolution})")
        return self


class ModelConfig(_Section):
    learner: Literal["gan", "ae", "vae", "energy"] = Field("gan", description=(
        "what trains: gan (G and D), ae (autoencoder), vae (variational autoencoder), energy (D "
        "alone, its negatives found by a search over its score); docs/architecture.md lists the keys each reads"))
    ae_noise: float = Field(0.0, ge=0.0, le=1e3, description=(
        "ae: std of the noise added to codes drawn from the Gaussian fitted to the training codes, when sampling"))
    # The energy learner's search (models/energy.py; defaults mirrored there as DEFAULT_*). Step
    # size and noise are in the start box's unit coordinates, so they suit data of any spread.
    energy_steps: int = Field(40, ge=1, le=10_000, description=(
        "energy: Langevin steps of the search that makes each training negative (D evaluations per negative)"))
    energy_step_size: float = Field(0.01, gt=0.0, le=1e3, description=(
        "energy: Langevin step along D's input gradient, in the start box's unit coordinates"))
    energy_noise: float = Field(0.001, ge=0.0, le=1e3, description=(
        "energy: std of the Gaussian noise of each Langevin step, in the start box's unit coordinates"))
    energy_buffer: int = Field(8192, ge=1, le=10_000_000, description=(
        "energy: replay buffer of past negatives (searches continue from them); at least schedule.batch_size"))
    energy_reinit: float = Field(0.05, ge=0.0, le=1.0, description=(
        "energy: probability that a negative's search starts afresh from the box instead of from the buffer"))
    energy_reg: float = Field(1.0, ge=0.0, le=1e4, description=(
        "energy: weight of the score-magnitude regulariser, reg * (E[D(real)^2] + E[D(negative)^2])"))
    energy_sample_steps: Optional[int] = Field(None, ge=1, le=1_000_000, description=(
        "energy: Langevin steps of the search that makes a sample (evaluation, ganray sample); unset: "
        "energy_steps / energy_reinit, the mean length of the chains behind the training negatives"))
    generator: str = Field("mlp", description="mlp | dcgan | an import path 'pkg.mod:Class'")
    discriminator: str = Field("mlp", description="mlp | dcgan | an import path 'pkg.mod:Class'")
    z_dim: int = Field(16, ge=1, le=4096)
    latent: Literal["normal", "uniform"] = Field("normal", description="z ~ N(0, I) or U(-1, 1) (DCGAN's; "
                                                 "splits evenly into equal-mass modes)")
    hidden: int = Field(256, ge=4, le=8192, description="MLP width")
    depth: int = Field(3, ge=1, le=16, description="MLP hidden layers")
    base_width: int = Field(64, ge=4, le=1024, description="DCGAN channels at the finest layer")
    spectral_norm: bool = False
    batchnorm: bool = Field(True, description="BatchNorm in the DCGAN generator")
    mlp_batchnorm: bool = Field(False, description="BatchNorm in the MLP generator (PacGAN's G)")
    mlp_skip: bool = Field(False, description="MLP generator: add a linear path from z to the output")
    pack: int = Field(1, ge=1, le=64, description="the discriminator (mlp or dcgan) judges this many samples "
                      "at once (PacGAN); the batch per worker must be a multiple of it")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="extra keyword arguments for import-path models")
    conditional: bool = Field(False, description=(
        "class-conditional GAN: G takes a class beside z, D is a projection discriminator; the "
        "classes come from the data's labels (docs/architecture.md)"))
    num_classes: Optional[int] = Field(None, ge=2, le=100_000, description=(
        "classes of a conditional model (labels 0..num_classes-1); required with conditional: true"))

    @model_validator(mode="after")
    def _check_conditional(self) -> "ModelConfig":
        if self.conditional and self.learner != "gan":
            raise ValueError(f"model.conditional: true trains a class-conditional GAN; model.learner "
                             f"'{self.learner}' has no classes: set model.learner: gan or model.conditional: false")
        if self.conditional and self.num_classes is None:
            raise ValueError("model.conditional: true needs model.num_classes (the number of classes in the "
                             "data's labels, e.g. 10 for digits)")
        return self


class LossConfig(_Section):
    kind: Literal["minimax", "nonsaturating", "wgan-gp", "hinge", "relativistic"] = Field("nonsaturating", description=(
        "adversarial loss; relativistic is RpGAN (R3GAN): softplus of the logit gap of (real, fake) pairs"))
    r1_gamma: float = Field(0.0, ge=0.0, le=1e4, description="R1 weight: gamma/2 * E||grad D(x)||^2 on real samples")
    r2_gamma: float = Field(0.0, ge=0.0, le=1e4, description=(
        "R2 weight: gamma/2 * E||grad D(G(z))||^2 on generated samples; lazy on r1_interval like R1"))
    r1_interval: int = Field(16, ge=1, le=1024, description=(
        "lazy regularisation: R1 and R2 every k D steps (weighted by k), on the same D steps"))
    gp_weight: float = Field(10.0, ge=0.0, le=1e4, description="WGAN-GP weight")
    instance_noise: float = Field(0.0, ge=0.0, le=1e3, description=(
        "std of Gaussian noise added to every input of D, real and fake (Sonderby et al. 2016); "
        "0 turns it off"))
    instance_noise_kimg: Optional[float] = Field(None, gt=0.0, description=(
        "absolute kimg at which instance_noise has decayed linearly to 0; unset keeps it constant"))


class ScheduleConfig(_Section):
    total_kimg: float = Field(200.0, gt=0.0, le=1e7, description="training length in thousands of real images")
    batch_size: int = Field(256, ge=1, le=1_000_000, description="global batch size (all workers)")
    n_critic: int = Field(1, ge=1, le=100, description="D steps per G step")
    g_lr: float = Field(2e-4, gt=0.0, le=1.0)
    d_lr: float = Field(2e-4, gt=0.0, le=1.0)
    betas: tuple[float, float] = Field((0.5, 0.99), description="Adam betas of both optimizers")
    ema_half_life_kimg: float = Field(10.0, ge=0.0, le=1e5, description="G_ema half-life; 0 turns EMA off")
    lr_decay: Literal["none", "linear", "cosine"] = "none"
    lr_decay_kimg: Optional[float] = Field(None, gt=0.0, description="absolute kimg at which decay reaches lr_min_factor")
    lr_min_factor: float = Field(0.0, ge=0.0, le=1.0)
    sync_kimg: float = Field(4.0, gt=0.0, description="metrics are gathered and logged every sync_kimg")
    checkpoint_kimg: float = Field(50.0, gt=0.0)
    keep_checkpoints: int = Field(3, ge=1, le=10_000)
    sample_kimg: float = Field(50.0, gt=0.0, description="sample grid / scatter interval")

    @model_validator(mode="after")
    def _check(self) -> "ScheduleConfig":
        for beta in self.betas:
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"schedule.betas must lie in [0, 1) (got {list(self.betas)})")
        if self.lr_decay != "none" and self.lr_decay_kimg is None:
            raise ValueError("schedule.lr_decay_kimg is required when schedule.lr_decay is "
                             f"'{self.lr_decay}' (decay is defined over absolute kimg)")
        return self


class TopologyConfig(_Section):
    kind: Literal["local", "replicated", "split"] = "replicated"
    num_workers: Optional[int] = Field(None, ge=1, le=4096, description="replicated: number of replicas (default 1)")
    min_workers: Optional[int] = Field(None, ge=1, le=4096, description="replicated: fewest replicas the job trains "
                                       "on after losing some (default num_workers: not elastic)")
    num_generators: Optional[int] = Field(None, ge=1, le=1024, description="split: generator workers (default 1)")
    num_discriminators: Optional[int] = Field(None, ge=1, le=1024, description="split: discriminator workers (default 2)")
    min_discriminators: Optional[int] = Field(None, ge=1, le=1024, description="split: fewest discriminators G trains "
                                              "against after losing some (default num_discriminators: not elastic)")
    feedback: Optional[Literal["mean", "max", "softmax"]] = Field(None, description="split: how G combines the K discriminators")
    softmax_lambda: Optional[float] = Field(None, ge=0.0, le=1e3, description="split: GMAN lambda for feedback=softmax")
    swap_every_epochs: Optional[int] = Field(None, ge=0, description="split: MD-GAN discriminator swap (0 = off)")
    overlap: Optional[bool] = Field(None, description="split: D trains on fakes of the previous G (staleness 1)")

    # Unset keys stay None here; `TrainConfig.layout` holds the resolved values and defaults.

    @model_validator(mode="after")
    def _check_keys_belong(self) -> "TopologyConfig":
        given = {k for k in self.model_fields_set if getattr(self, k) is not None}
        wrong = [k for k, owner in KEY_OWNER.items() if k in given and owner != self.kind]
        if wrong and KEY_OWNER[wrong[0]] == "replicated":
            raise ValueError(f"topology.{wrong[0]} belongs to topology.kind 'replicated', not "
                             f"'{self.kind}'; remove it" + (" and use topology.num_generators / "
                             "topology.num_discriminators" if self.kind == "split" else ""))
        if wrong:
            raise ValueError(f"topology.{wrong[0]} belongs to topology.kind 'split', not "
                             f"'{self.kind}'; remove it or set topology.kind: split")
        return self


class RoleResources(_Section):
    cpus: float = Field(1.0, ge=0.0, le=1024)
    gpus: float = Field(0.0, ge=0.0, le=64)


class ResourcesConfig(_Section):
    threads_per_worker: int = Field(1, ge=1, le=256, description="torch threads per worker (and for local)")
    cpus_per_worker: float = Field(1.0, ge=0.0, le=1024)
    gpus_per_worker: float = Field(0.0, ge=0.0, le=64)
    generator: Optional[RoleResources] = Field(None, description="split: resources of each generator worker")
    discriminator: Optional[RoleResources] = Field(None, description="split: resources of each discriminator worker")
    strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    placement_timeout_s: float = Field(60.0, gt=0.0, le=86_400)
    ray_address: Optional[str] = Field(None, description="Ray cluster address; else RAY_ADDRESS; else a local instance")
    connect_timeout_s: float = Field(60.0, gt=0.0, le=3600, description="how long to wait for an explicit Ray "
                                     "address to answer before stopping with one line")
    num_cpus: Optional[int] = Field(None, ge=1, description="logical CPUs of a local Ray instance (default: the machine's)")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["fp32", "bf16"] = Field("fp32", description="bf16 autocast on CUDA")
    channels_last: Optional[bool] = Field(
        None, description="channels_last memory format for conv nets; unset: on for CPU (oneDNN's NHWC "
                          "kernels are the faster path), off on CUDA (mixed there: see docs/performance.md)")
    step_timeout_s: float = Field(600.0, gt=0.0, description="a worker call slower than this counts as hung")
    compile: bool = Field(
        False, description="torch.compile G's and D's forward passes in the phases that take no double backward "
                           "(R1, R2 and the WGAN-GP penalty stay eager); the first rounds pay the compile time "
                           "(model.learner gan)")
    compile_backend: Literal["inductor", "aot_eager"] = Field(
        "inductor", description="torch.compile's backend: inductor (generated kernels) or aot_eager (the traced "
                                "graphs run by eager kernels: a check of the tracing, no speed-up)")
    collective: Literal["auto", "gloo"] = Field(
        "auto", description="how the workers' all-reduces travel: auto (shared memory when every rank "
                            "shares a host, else gloo on CPU, nccl on GPU) or gloo (always, as between "
                            "hosts: a one-host test runs a cluster's path)")


class TrackingConfig(_Section):
    uri: Optional[str] = Field(None, description="MLflow tracking URI; else MLFLOW_TRACKING_URI; else sqlite in cwd")
    experiment: str = Field("ganray", min_length=1)
    model_name: Optional[str] = Field(None, description="register the EMA generator under this name at the end")
    run_name: Optional[str] = None
    enabled: bool = Field(True, description="false: no MLflow at all (benchmarks)")
    buffer_size: int = Field(100_000, ge=10, description="metric points buffered while the server is away")
    log_system_metrics: bool = Field(True, description="system/* metrics (CPU, memory, disk) of the coordinator's "
                                     "machine and system/<node>/* of each worker node at each sync point, "
                                     "when psutil is installed")


# eval.num_samples when unset: the papers' 26,000 for stacked digits (PacGAN, VEEGAN), else 2,500.
STACKED_DIGITS_EVAL_SAMPLES, EVAL_SAMPLES = 26_000, 2_500


class EvalConfig(_Section):
    every_kimg: float = Field(50.0, gt=0.0)
    num_samples: Optional[int] = Field(None, ge=16, le=1_000_000, description=(
        "samples per evaluation; unset: 26000 for data.name stacked-digits (the papers' count), else 2500, "
        "resolved when the config is loaded (TrainConfig._resolve_eval_samples), so the logged params show it"))
    seed: int = Field(1234, ge=0)
    metrics: list[str] = Field(default_factory=lambda: ["auto"], description="auto | modes,hq,kl | fid,kid | "
                               "modes,kl,confidence (stacked-digits)")
    inception_weights: Optional[str] = Field(None, description="local path of Inception weights for FID on RGB sets")


class AugmentConfig(_Section):
    kind: Literal["none", "ada", "diffaugment"] = Field("none", description=(
        "augment everything D sees, real and fake, in every D and G phase (images only): ada "
        "(StyleGAN2-ADA: each augmentation with probability p, steered by r_t = E[sign(D(real))]) or "
        "diffaugment (every augmentation always, p fixed); none leaves the numbers exactly as without"))
    target: float = Field(0.6, gt=0.0, lt=1.0, description="ada: the r_t that p is steered towards")
    interval: int = Field(4, ge=1, le=1_000_000, description="ada: p moves every this many D steps")
    speed_kimg: float = Field(500.0, gt=0.0, le=1e7, description=(
        "ada: thousands of real images over which p could go from 0 to 1 (StyleGAN2-ADA's 500; "
        "smaller reacts faster, for small data and short runs)"))
    flip: bool = Field(False, description="horizontal flips too (off: digits are not mirror-symmetric)")
    p_init: Optional[float] = Field(None, ge=0.0, le=1.0, description=(
        "p at the start; unset: 0 for ada, 1 for diffaugment"))


class FaultConfig(_Section):
    snapshot_rounds: int = Field(200, ge=1, description="state snapshot in the object store every N rounds")
    max_restarts: int = Field(3, ge=0)
    max_nonfinite: int = Field(3, ge=1, description="non-finite steps in a row before rolling back")
    lr_backoff: float = Field(0.5, gt=0.0, le=1.0)
    grace_s: float = Field(30.0, gt=0.0)
    capacity_wait_s: float = Field(120.0, gt=0.0)


class RetrainConfig(_Section):
    kimg: float = Field(50.0, gt=0.0)
    metric: Optional[str] = Field(None, description="default: kl for 2D sets, fid for images")
    mode: Optional[Literal["min", "max"]] = None
    min_improvement: float = Field(0.0, ge=0.0)
    lock_ttl_s: float = Field(3600.0, gt=0.0)
    trust_code: bool = Field(False, description="allow the champion's stored config to import code this config does "
                             "not name (for unattended retrains; GANRAY_TRUST_CODE=1 does the same)")


_DEFAULT_FLAT: Optional[dict[str, Any]] = None  # the default config, flattened (learner_keys.py)


class TrainConfig(_Section):
    seed: int = Field(0, ge=0, le=2**31 - 1)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    topology: TopologyConfig = Field(default_factory=TopologyConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    fault: FaultConfig = Field(default_factory=FaultConfig)
    retrain: RetrainConfig = Field(default_factory=RetrainConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)

    _layout: Optional[Layout] = PrivateAttr(None)

    @model_validator(mode="after")
    def _resolve_eval_samples(self) -> "TrainConfig":
        if self.eval.num_samples is None:
            stacked = self.data.name == "stacked-digits"
            self.eval.num_samples = STACKED_DIGITS_EVAL_SAMPLES if stacked else EVAL_SAMPLES
        return self

    @model_validator(mode="after")
    def _check_learner(self) -> "TrainConfig":
        learner = self.model.learner
        if learner != "gan" and self.topology.kind == "split":
            raise ValueError(f"topology.kind 'split' trains a GAN (G and D on different workers); "
                             f"model.learner '{learner}' runs in topology.kind local or replicated")
        global _DEFAULT_FLAT
        if _DEFAULT_FLAT is None:
            _DEFAULT_FLAT = flatten(TrainConfig.model_construct().model_dump(mode="json"))
        unread = unread_keys(learner, self.flat(), _DEFAULT_FLAT)
        if unread:
            raise ValueError(f"{unread[0]} is not read by model.learner '{learner}'"
                             + (f" (nor {', '.join(unread[1:])})" if len(unread) > 1 else "")
                             + "; remove it (docs/architecture.md lists the keys each learner reads)")
        return self

    @model_validator(mode="after")
    def _resolve_layout(self) -> "TrainConfig":
        # Every section is valid here; the layout is resolved (and checked) once, also when a
        # section is reassigned (validate_assignment runs this again).
        self._layout = resolve_layout(self)
        return self

    @property
    def layout(self) -> Layout:
        """The resolved topology: worker specs, batch parts, bundles (see layout.py)."""
        assert self._layout is not None
        return self._layout

    def flat(self) -> dict[str, Any]:
        """The resolved config flattened to dotted keys (MLflow params, resume comparison)."""
        return flatten(self.model_dump(mode="json"))

    def config_hash(self, ignore: tuple[str, ...] = (), only: Optional[frozenset[str]] = None) -> str:
        """sha256 of the resolved config, ignoring keys allowed to change across resume; with
        `only`, over those keys alone (the keys a run's stored config had, so a key added to
        ganray since, at its default, does not make the run's checkpoints foreign)."""
        flat = {k: v for k, v in self.flat().items() if k not in ignore and (only is None or k in only)}
        return hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _drop_keys_of_other_kinds(tree: dict[str, Any], overrides: list[str]) -> None:
    """`--set topology.kind=K` switches the topology in one override: the file's topology keys
    that belong to another kind are dropped (with a note), so they are in neither the resolved
    config nor its hash. Keys given by `--set` are never dropped: a conflict there is an error."""
    given = [parse_override(text)[0] for text in overrides]
    if ["topology", "kind"] not in given or not isinstance(tree.get("topology"), dict):
        return
    topology = tree["topology"]
    kind = topology.get("kind")
    for key, owner in KEY_OWNER.items():
        if owner != kind and topology.get(key) is not None and ["topology", key] not in given:
            log.warning("topology.%s belongs to topology.kind '%s': dropped from the config for "
                        "--set topology.kind=%s", key, owner, kind)
            del topology[key]


def config_from_dict(tree: Any, overrides: Optional[list[str]] = None) -> TrainConfig:
    if tree is None:
        tree = {}
    if not isinstance(tree, dict):
        raise ConfigError(f"the config must be a YAML mapping of sections (seed, data, model, ...), "
                          f"not a {type(tree).__name__}")
    tree = apply_overrides(tree, overrides or [])
    _drop_keys_of_other_kinds(tree, overrides or [])
    try:
        return TrainConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, TrainConfig)) from None


def load_config(path: Optional[str | Path], overrides: Optional[list[str]] = None) -> TrainConfig:
    """Load a YAML job config (or the defaults when path is None) and apply `--set` overrides."""
    tree: Any = {} if path is None else read_yaml_file(path, "config", "configs/grid25.yaml")
    return config_from_dict(tree, overrides)


# Keys that may change when a run is resumed (extending a run must not be refused).
RESUME_ALLOWED = (
    "schedule.total_kimg", "schedule.checkpoint_kimg", "schedule.keep_checkpoints",
    "schedule.sync_kimg", "schedule.sample_kimg", "eval.every_kimg", "eval.num_samples",
    "tracking.uri", "tracking.model_name", "tracking.run_name", "tracking.buffer_size",
    "tracking.log_system_metrics", "resources.ray_address", "resources.connect_timeout_s",
    "resources.placement_timeout_s", "resources.collective",
    "topology.num_workers", "topology.min_workers", "topology.min_discriminators",
    "resources.num_cpus", "resources.step_timeout_s", "fault.snapshot_rounds",
    "fault.max_restarts", "fault.grace_s", "fault.capacity_wait_s",
)


def config_differences(old: TrainConfig, new: TrainConfig, allowed: tuple[str, ...] = RESUME_ALLOWED) -> list[str]:
    a, b = old.flat(), new.flat()
    return sorted(k for k in set(a) | set(b) if k not in allowed and a.get(k) != b.get(k))
