"""The deployment files under deploy/: KubeRay manifests valid against the v1.7.0 CRD schemas and
the controller rules the schemas do not carry, core Kubernetes objects well formed, the pieces
consistent with each other (service names, secrets, images, configs), no credential outside
secrets.example.yaml, the retraining schedule keys as the shells will expand them, and the
`ray up` config valid against the installed Ray's schema.
"""

from __future__ import annotations

import copy
import fnmatch
import functools
import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

from ganray.orchestrator.job.config import load_config

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
SECRETS_EXAMPLE = "secrets.example.yaml"
KUBERAY_SCHEMAS = DEPLOY / "schemas" / "kuberay-v1.7.0"  # KubeRay's CRDs, kept in the repository
IMAGE_ROOT = "/home/ray/ganray/"  # where deploy/Dockerfile puts the repository in the image


def _import_validate() -> Any:
    # deploy/ is not a package (nothing of it is installed); load its checker by path.
    spec = importlib.util.spec_from_file_location("ganray_deploy_validate", DEPLOY / "validate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


V = _import_validate()


@functools.cache
def _manifests() -> dict[str, list[dict[str, Any]]]:
    return {p.name: V.load_docs(p) for p in sorted(K8S.glob("*.yaml"))}


def _all_docs() -> list[tuple[str, dict[str, Any]]]:
    return [(name, doc) for name, docs in _manifests().items() for doc in docs]


def _one(kind: str, name: str) -> dict[str, Any]:
    found = [d for _, d in _all_docs() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} named {name}, found {len(found)}"
    return copy.deepcopy(found[0])


def _arg(args: list[str], flag: str) -> str | None:
    return V.flag_value(args, flag)


def _crds() -> Path:
    assert sorted(p.name for p in KUBERAY_SCHEMAS.glob("ray.io_*.yaml")) == [
        "ray.io_rayclusters.yaml", "ray.io_raycronjobs.yaml", "ray.io_rayjobs.yaml"], KUBERAY_SCHEMAS
    return KUBERAY_SCHEMAS


def _schema_errors(doc: dict[str, Any]) -> list[str]:
    return V.schema_errors(doc, _crds())


RAY_KINDS = set(V.CRD_FILES)


def _ray_docs() -> list[tuple[str, dict[str, Any]]]:
    return [(f, d) for f, d in _all_docs() if d["kind"] in RAY_KINDS]


def test_expected_manifests_exist() -> None:
    kinds = {d["kind"] for _, d in _all_docs()}
    assert {"RayCluster", "RayJob", "RayCronJob", "CronJob", "Deployment", "Service", "Secret"} <= kinds
    for name in ("raycluster.yaml", "rayjob-train.yaml", "raycronjob-retrain.yaml",
                 "cronjob-retrain.yaml", "mlflow.yaml", SECRETS_EXAMPLE):
        assert name in _manifests(), f"deploy/k8s/{name} is missing"


@pytest.mark.parametrize("file,doc", _ray_docs(), ids=lambda v: v if isinstance(v, str) else v["metadata"]["name"])
def test_kuberay_documents_match_crd_schema(file: str, doc: dict[str, Any]) -> None:
    assert _schema_errors(doc) == [], f"{file}: {doc['kind']} does not match the v1.7.0 CRD"


@pytest.mark.parametrize("file,doc", _ray_docs(), ids=lambda v: v if isinstance(v, str) else v["metadata"]["name"])
def test_kuberay_documents_follow_controller_rules(file: str, doc: dict[str, Any]) -> None:
    assert V.controller_rule_violations(doc) == []


def test_submission_mode_default_in_crd_is_a_known_mode() -> None:
    validator = V.crd_validator(_crds(), "RayJob", "ray.io/v1")
    default = validator.schema["properties"]["spec"]["properties"]["submissionMode"]["default"]
    assert default in V.SUBMISSION_MODES


def _break(kind: str, name: str, edit: Any) -> dict[str, Any]:
    doc = _one(kind, name)
    edit(doc)
    return doc


BROKEN_RULES = {
    "ttl-without-shutdown": ("RayJob", "ganray-train-grid25", "ttlSecondsAfterFinished",
                             lambda d: d["spec"].update(shutdownAfterJobFinishes=False)),
    "cron-name-37-chars": ("RayCronJob", "ganray-retrain", "at most 36",
                           lambda d: d["metadata"].update(name="ganray-retrain-" + "x" * 22)),
    "unknown-submission-mode": ("RayJob", "ganray-train-grid25", "submissionMode",
                                lambda d: d["spec"].update(submissionMode="K8sMode")),
    "cron-template-ttl": ("RayCronJob", "ganray-retrain", "jobTemplate: ttlSecondsAfterFinished",
                          lambda d: d["spec"]["jobTemplate"].pop("shutdownAfterJobFinishes")),
    "cron-tz-in-schedule": ("RayCronJob", "ganray-retrain", "timeZone",
                            lambda d: d["spec"].update(schedule="CRON_TZ=UTC 0 3 * * *")),
    "token-auth-old-ray": ("RayCluster", "ganray", "2.52.0",
                           lambda d: d["spec"].update(rayVersion="2.50.0")),
    "replicas-above-max": ("RayCluster", "ganray", "minReplicas <= replicas",
                           lambda d: d["spec"]["workerGroupSpecs"][0].update(replicas=9)),
}


@pytest.mark.parametrize("case", sorted(BROKEN_RULES))
def test_controller_rules_catch_broken_copies(case: str) -> None:
    kind, name, expected, edit = BROKEN_RULES[case]
    assert V.controller_rule_violations(_one(kind, name)) == []
    violations = V.controller_rule_violations(_break(kind, name, edit))
    assert any(expected in v for v in violations), violations


@pytest.mark.parametrize("edit,expected", [
    (lambda d: d["spec"].update(shutdownAfterJobFinish=True), "shutdownAfterJobFinish"),
    (lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].update(replicas="2"), "replicas"),
    (lambda d: d["spec"].update(rayClusterSpec=[]), "rayClusterSpec"),
])
def test_crd_schema_catches_broken_copies(edit: Any, expected: str) -> None:
    assert any(expected in e for e in _schema_errors(_break("RayJob", "ganray-train-grid25", edit)))


def test_validate_cli_passes_the_manifests_and_fails_a_broken_one(tmp_path: Path) -> None:
    files = [str(p) for p in sorted(K8S.glob("*.yaml"))]
    assert V.main([*files, "--crds", str(_crds())]) == 0
    broken = _break("RayJob", "ganray-train-grid25", lambda d: d["spec"].update(shutdownAfterJobFinishes=False))
    broken["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"].append(
        {"name": "MLFLOW_TRACKING_PASSWORD", "value": "hunter2hunter2"})
    (tmp_path / "broken.yaml").write_text(json.dumps(broken))  # JSON is YAML
    problems = V.check_file(tmp_path / "broken.yaml", _crds())
    assert any("ttlSecondsAfterFinished" in p for p in problems)
    assert any("MLFLOW_TRACKING_PASSWORD" in p for p in problems)
    assert V.main([str(tmp_path / "broken.yaml"), "--crds", str(_crds())]) == 1


# ---------------------------------------------------------------------------------------------
# Core Kubernetes objects


def test_core_objects_are_well_formed() -> None:
    for file, doc in _all_docs():
        where = f"{file}: {doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        assert doc.get("apiVersion") and doc.get("kind") and doc.get("metadata", {}).get("name"), where
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == "ganray", where
        if doc["kind"] == "Secret":
            assert file == SECRETS_EXAMPLE, f"{where}: Secrets belong in {SECRETS_EXAMPLE} only"
            assert all(isinstance(v, str) for v in doc.get("stringData", {}).values()), where
        for c in V.containers(doc):
            assert c.get("name") and c.get("image"), where
            # command, args and env values are string lists/strings in the API: `- 5000` is refused.
            assert all(isinstance(a, str) for a in c.get("command", []) + c.get("args", [])), where
            assert all(isinstance(e.get("value", ""), str) for e in c.get("env", [])), where
            env_names = [e["name"] for e in c.get("env", [])]
            assert len(env_names) == len(set(env_names)), f"{where}: duplicate env in {c['name']}"
            res = c.get("resources", {})
            for rname, qty in res.get("requests", {}).items():
                if "/" in rname:  # extended resources (GPUs) are not overcommitted: request == limit
                    assert res.get("limits", {}).get(rname) == qty, f"{where}: {rname} request != limit"
        if doc["kind"] in ("Deployment", "CronJob"):
            for c in V.containers(doc):
                assert c.get("command") or c.get("args"), f"{where}: {c['name']} has no command/args"
        if doc["kind"] == "Deployment":
            assert doc["apiVersion"] == "apps/v1", where
            labels = doc["spec"]["template"]["metadata"]["labels"]
            assert doc["spec"]["selector"]["matchLabels"].items() <= labels.items(), where
        if doc["kind"] == "Service":
            assert doc["apiVersion"] == "v1" and doc["spec"]["ports"], where
            selected = [d for _, d in _all_docs() if d["kind"] == "Deployment" and
                        doc["spec"]["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items()]
            assert selected, f"{where}: the selector matches no Deployment"
        if doc["kind"] == "CronJob":
            assert doc["apiVersion"] == "batch/v1" and len(doc["spec"]["schedule"].split()) == 5, where
            assert doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]["restartPolicy"] in ("Never", "OnFailure")


def test_gpu_worker_groups_request_gpus() -> None:
    for name in ("ganray", "ganray-train-grid25"):
        doc = _one("RayCluster" if name == "ganray" else "RayJob", name)
        spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
        limits = [c["resources"]["limits"] for g in spec["workerGroupSpecs"]
                  for c in g["template"]["spec"]["containers"]]
        assert limits and all(int(lim.get("nvidia.com/gpu", 0)) >= 1 for lim in limits), name


def _mlflow_container() -> dict[str, Any]:
    (container,) = _one("Deployment", "mlflow")["spec"]["template"]["spec"]["containers"]
    return container


def test_mlflow_server_is_locked_down_and_backed_by_postgres() -> None:
    c = _mlflow_container()
    args = c["args"]
    assert c["command"][:2] == ["mlflow", "server"]
    assert _arg(args, "--app-name") == "basic-auth"
    assert _arg(args, "--host") == "0.0.0.0"
    assert _arg(args, "--allowed-hosts")
    assert _arg(args, "--artifacts-destination")
    backend = _arg(args, "--backend-store-uri")
    var = re.fullmatch(r"\$\((\w+)\)", backend or "")
    assert var, "the backend URI must come from the environment ($(VAR)), not be written inline"
    env = {e["name"]: e for e in c["env"]}
    ref = env[var.group(1)]["valueFrom"]["secretKeyRef"]
    value = _secret_values()[(ref["name"], ref["key"])]
    assert value.startswith(("postgresql://", "postgresql+psycopg2://"))
    assert "MLFLOW_AUTH_ADMIN_PASSWORD" in env and "valueFrom" in env["MLFLOW_AUTH_ADMIN_PASSWORD"]


def _host_allowed(allowed: list[str], host: str) -> bool:
    # mlflow.server.security_utils.is_allowed_host_header: exact match, or fnmatch with '*'.
    return "*" in allowed or any(fnmatch.fnmatch(host, a) if "*" in a else host == a for a in allowed)


def test_ray_pods_reach_mlflow_through_its_service_and_allowed_hosts() -> None:
    allowed = _arg(_mlflow_container()["args"], "--allowed-hosts").split(",")
    service = _one("Service", "mlflow")
    uris = {e["value"] for _, d in _ray_docs() for c in V.containers(d) for e in c.get("env", [])
            if e["name"] == "MLFLOW_TRACKING_URI"}
    assert uris, "Ray pods must get MLFLOW_TRACKING_URI"
    for uri in uris:
        parts = urlsplit(uri)
        assert _host_allowed(allowed, parts.netloc), f"{parts.netloc} is not in --allowed-hosts"
        labels = parts.hostname.split(".")
        assert labels[0] == service["metadata"]["name"]
        assert len(labels) == 1 or labels[1] == service["metadata"]["namespace"]
        assert parts.port in {p["port"] for p in service["spec"]["ports"]}
    assert not _host_allowed(allowed, "mlflow.attacker.example:5000")
    for _, d in _ray_docs():
        for c in V.containers(d):
            env = {e["name"]: e for e in c.get("env", [])}
            for var in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
                assert "secretKeyRef" in env[var]["valueFrom"], f"{d['metadata']['name']}: {var}"


# ---------------------------------------------------------------------------------------------
# Secrets


@functools.cache
def _secret_values() -> dict[tuple[str, str], str]:
    return {(d["metadata"]["name"], k): v for d in _manifests()[SECRETS_EXAMPLE]
            if d["kind"] == "Secret" for k, v in d.get("stringData", {}).items()}


def _secret_refs() -> Iterator[tuple[str, str, bool]]:
    for _, doc in _all_docs():
        for node in V.walk(doc):
            if not isinstance(node, dict):
                continue
            if isinstance(node.get("secretKeyRef"), dict):
                ref = node["secretKeyRef"]
                yield ref["name"], ref["key"], bool(ref.get("optional"))
            if isinstance(node.get("authOptions"), dict) and node["authOptions"].get("secretName"):
                yield node["authOptions"]["secretName"], "auth_token", False
            if isinstance(node.get("secret"), dict) and node["secret"].get("secretName"):
                for item in node["secret"].get("items", []):
                    yield node["secret"]["secretName"], item["key"], False


def test_every_referenced_secret_key_is_in_the_example() -> None:
    refs = list(_secret_refs())
    assert len(refs) > 10
    missing = {(n, k) for n, k, optional in refs if not optional and (n, k) not in _secret_values()}
    assert not missing, f"secrets.example.yaml lacks {sorted(missing)}"


def test_example_secret_values_are_marked_placeholders() -> None:
    for (name, key), value in _secret_values().items():
        if V.SENSITIVE_KEY.search(key.replace("-", "_")) or "uri" in key or key.endswith(".ini"):
            assert "REPLACE_ME" in value, f"{name}/{key} must be an obvious REPLACE_ME placeholder"


def test_no_literal_credentials_outside_secrets_example() -> None:
    for file, docs in _manifests().items():
        if file != SECRETS_EXAMPLE:
            assert [d["kind"] for d in docs if d["kind"] == "Secret"] == [], f"{file}: Secrets go in {SECRETS_EXAMPLE}"
            assert V.credential_leaks(docs) == [], file
    for path in (DEPLOY / "ray-up.yaml", DEPLOY / "Dockerfile", DEPLOY / "Dockerfile.mlflow"):
        text = path.read_text()
        assert not V.URI_WITH_PASSWORD.search(text), path.name
        assert not re.search(r"(?i)\b\w*(PASSWORD|TOKEN)\s*=\s*\S", text), path.name
    assert V.credential_leaks(_manifests()[SECRETS_EXAMPLE])  # the detector does see credentials


@pytest.mark.parametrize("plant", [
    lambda c: c["env"].append({"name": "MLFLOW_TRACKING_PASSWORD", "value": "hunter2hunter2"}),
    lambda c: c["env"].append({"name": "MLFLOW_TRACKING_URI", "value": "http://u:hunter2@mlflow:5000"}),
    lambda c: c["env"].append({"name": "RAY_AUTH_TOKEN", "value": "abc123"}),
])
def test_credential_detector_flags_planted_values(plant: Any) -> None:
    doc = _one("RayCluster", "ganray")
    plant(doc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0])
    assert V.credential_leaks(doc)


# ---------------------------------------------------------------------------------------------
# Entrypoints, schedule keys, images


def _entrypoint(doc: dict[str, Any]) -> list[str]:
    spec = doc["spec"]["jobTemplate"] if doc["kind"] == "RayCronJob" else doc["spec"]
    return shlex.split(spec["entrypoint"])


def _repo_path(image_path: str) -> Path:
    assert image_path.startswith(IMAGE_ROOT), f"{image_path}: use absolute paths inside the image"
    return REPO / image_path[len(IMAGE_ROOT):]


def _train_config() -> Any:
    train = _entrypoint(_one("RayJob", "ganray-train-grid25"))
    assert train[:2] == ["ganray", "train"]
    return load_config(_repo_path(train[2]), [train[i + 1] for i, a in enumerate(train) if a == "--set"])


def test_train_entrypoint_loads_and_fits_its_cluster() -> None:
    cfg = _train_config()
    spec = _one("RayJob", "ganray-train-grid25")["spec"]["rayClusterSpec"]
    gpus = sum(g["replicas"] * int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get(
        "nvidia.com/gpu", 0)) for g in spec["workerGroupSpecs"])
    assert cfg.topology.kind == "replicated" and cfg.resources.gpus_per_worker >= 1
    assert sum(s.gpus for s in cfg.layout.workers) <= gpus, "more GPUs asked than the cluster has"
    assert cfg.tracking.model_name, "the training job must register a model for retraining to compare"


def test_tune_entrypoint_names_shipped_files() -> None:
    tune = _entrypoint(_one("RayJob", "ganray-tune-grid25-pbt"))
    assert tune[:2] == ["ganray", "tune"]
    load_config(_repo_path(tune[2]))
    search = _repo_path(_arg(tune, "--search") or "")
    assert search.is_file(), f"{search.relative_to(REPO)} is not in the repository"


def test_retrain_entrypoint_targets_the_trained_model() -> None:
    retrain = _entrypoint(_one("RayCronJob", "ganray-retrain"))
    assert retrain[:2] == ["ganray", "retrain"] and _arg(retrain, "--schedule-key")
    load_config(_repo_path(retrain[2]))
    # Retraining compares against the champion of the model the training job registers.
    assert _arg(retrain, "--model-name") == _train_config().tracking.model_name


def test_raycronjob_schedule_key_is_the_child_rayjob_name() -> None:
    bash = shutil.which("bash")
    assert bash, "bash runs KubeRay's submitter script here"
    cron = _one("RayCronJob", "ganray-retrain")
    assert cron["spec"]["jobTemplate"]["submissionMode"] == "K8sJobMode"  # the variable's source
    # KubeRay's submitter runs `bash -ce "... ray job submit ... -- <entrypoint>"` with
    # RAY_JOB_SUBMISSION_ID = <RayJob name>-<5 random chars>; the RayJob name is
    # <RayCronJob name>-<scheduled Unix minute>. Stand in a function for `ganray`.
    child = f"{cron['metadata']['name']}-29412345"
    entry = cron["spec"]["jobTemplate"]["entrypoint"]
    out = subprocess.run([bash, "-ce", f'ganray() {{ printf "%s\\n" "$@"; }}; {entry}'], text=True,
                         capture_output=True, check=True, env={"RAY_JOB_SUBMISSION_ID": child + "-x7k2q"})
    args = out.stdout.splitlines()
    assert _arg(args, "--schedule-key") == child


def _cronjob_script() -> str:
    (container,) = V.containers(_one("CronJob", "ganray-retrain"))
    assert container["command"][:2] == ["/bin/bash", "-c"]
    return container["args"][0]


def _run_cronjob(tmp_path: Path, env: dict[str, str]) -> tuple[int, list[str]]:
    stubs = tmp_path / "bin"
    stubs.mkdir(exist_ok=True)
    calls = tmp_path / "calls"
    (stubs / "ray").write_text('#!/bin/sh\necho "ray $*" >> "$CALLS"\n'
                               '[ "$2" = status ] && exit "${STATUS_RC:-1}"\nexit 0\n')
    (stubs / "python").write_text('#!/bin/sh\ncat > /dev/null\necho "python $*" >> "$CALLS"\n'
                                  'exit "${FINAL_RC:-0}"\n')
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    rc = subprocess.run(["bash", "-c", _cronjob_script()], capture_output=True, env={
        "PATH": f"{stubs}:/usr/bin:/bin", "CALLS": str(calls), **env}).returncode
    return rc, calls.read_text().splitlines() if calls.exists() else []


def test_cronjob_fallback_submits_once_per_scheduled_time(tmp_path: Path) -> None:
    assert shutil.which("bash"), "bash runs the CronJob's script here"
    cluster = _one("RayCluster", "ganray")
    address = f"http://{cluster['metadata']['name']}-head-svc.{cluster['metadata']['namespace']}.svc.cluster.local:8265"
    job = "ganray-retrain-29412345"

    rc, calls = _run_cronjob(tmp_path, {"JOB_NAME": job})
    assert rc == 0
    submits = [shlex.split(c) for c in calls if c.startswith("ray job submit")]
    assert len(submits) == 1
    submit = submits[0]
    assert _arg(submit, "--address") == address and _arg(submit, "--submission-id") == job
    entry = submit[submit.index("--") + 1:]
    assert entry[:2] == ["ganray", "retrain"] and _arg(entry, "--schedule-key") == job
    # Both schedulers retrain the same config and model.
    scheduled = _entrypoint(_one("RayCronJob", "ganray-retrain"))
    assert entry[2] == scheduled[2] and _arg(entry, "--model-name") == _arg(scheduled, "--model-name")
    assert any(c.startswith("python") and job in c for c in calls)

    (tmp_path / "calls").unlink()  # a retried pod finds the Ray job already submitted
    rc, calls = _run_cronjob(tmp_path, {"JOB_NAME": job, "STATUS_RC": "0"})
    assert rc == 0 and not any(c.startswith("ray job submit") for c in calls)

    (tmp_path / "calls").unlink()  # a failed Ray job fails the Kubernetes Job
    assert _run_cronjob(tmp_path, {"JOB_NAME": job, "FINAL_RC": "1"})[0] != 0
    assert _run_cronjob(tmp_path, {})[0] != 0  # no job name, no submission

    cron = _one("CronJob", "ganray-retrain")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    env = {e["name"]: e for e in V.containers(cron)[0]["env"]}
    assert env["JOB_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == \
        "metadata.labels['batch.kubernetes.io/job-name']"


@pytest.mark.parametrize("status,code", [("SUCCEEDED", 0), ("FAILED", 1), ("STOPPED", 1)])
def test_cronjob_status_check_exits_by_ray_job_status(monkeypatch: Any, status: str, code: int) -> None:
    import ray.job_submission as job_submission
    body = _cronjob_script().split("<<'EOF'\n", 1)[1].split("\nEOF", 1)[0]

    class FakeClient:  # the snippet's only contact with the cluster
        def __init__(self, address: str) -> None:
            assert address == "http://head:8265"

        def get_job_status(self, job_id: str) -> Any:
            assert job_id == "ganray-retrain-29412345"
            return job_submission.JobStatus(status)

    monkeypatch.setattr(job_submission, "JobSubmissionClient", FakeClient)
    monkeypatch.setattr(sys, "argv", ["-", "http://head:8265", "ganray-retrain-29412345"])
    with pytest.raises(SystemExit) as exit_info:
        exec(compile(body, "cronjob-status-check", "exec"), {})
    assert exit_info.value.code == code


def _dockerfile_base() -> str:
    match = re.search(r"^FROM\s+(\S+)", (DEPLOY / "Dockerfile").read_text(), re.M)
    assert match
    return match.group(1)


def test_dockerfile_matches_project_and_manifests() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    base = _dockerfile_base()
    assert base == "rayproject/ray:2.60.0-py311-gpu"
    ray_version = base.split(":")[1].split("-")[0]
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0")
    assert re.search(rf"^WORKDIR\s+{IMAGE_ROOT.rstrip('/')}$", text, re.M)
    for src in re.findall(r"^COPY\s+(?:--\S+\s+)*(.+?)\s+\S+$", text, re.M):
        for path in src.split():
            assert (REPO / path).exists(), f"the Dockerfile copies {path}, which is not in the repository"
    assert "pip install --no-cache-dir" in text and f'"ray[default,tune]=={ray_version}"' in text
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_req = next(d for d in deps if re.match(r"torch[<>=!~ ]", d))
    assert f'"{torch_req}"' in text, f"the Dockerfile's torch pin must equal pyproject's {torch_req}"
    images = {c["image"] for _, d in _ray_docs() for c in V.containers(d)}
    images |= {c["image"] for c in V.containers(_one("CronJob", "ganray-retrain"))}
    assert len(images) == 1, f"every Ray pod and the CronJob must run the one ganray image: {images}"
    for _, d in _ray_docs():
        for node in V.walk(d):
            if isinstance(node, dict) and "rayVersion" in node:
                assert node["rayVersion"] == ray_version, d["metadata"]["name"]


# ---------------------------------------------------------------------------------------------
# ray up


@functools.cache
def _ray_schema() -> dict[str, Any]:
    import ray  # a dependency of ganray: the schema ships with the installed version

    path = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
    return json.loads(path.read_text())


def test_ray_up_config_validates_against_installed_ray() -> None:
    config = V.load_docs(DEPLOY / "ray-up.yaml")[0]
    jsonschema.validate(config, _ray_schema())
    # What `ray up` runs before it talks to the cloud: defaults merged in, then its own checks.
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))
    assert config["docker"]["image"] == _dockerfile_base()
    workers = [t for name, t in config["available_node_types"].items() if name != config["head_node_type"]]
    assert any(t["node_config"]["InstanceType"].startswith(("g", "p")) for t in workers), "no GPU node type"
    assert (REPO / config["file_mounts"][IMAGE_ROOT.rstrip("/")]).resolve() == REPO
    assert any(IMAGE_ROOT.rstrip("/") in cmd and "pip install" in cmd for cmd in config["setup_commands"])

    broken = copy.deepcopy(config)
    broken["available_node_types"]["ray.worker.gpu"]["min_worker"] = 1
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, _ray_schema())


# ---------------------------------------------------------------------------------------------
# Closed by default: no listener on every interface without authentication

def _deploy_files() -> dict[str, str]:
    paths = [DEPLOY / "ray-up.yaml", *sorted(K8S.glob("*.yaml")), *sorted(DEPLOY.glob("Dockerfile*"))]
    return {p.name: p.read_text() for p in paths if not p.name.endswith(".dockerignore")}


@pytest.mark.parametrize("name", sorted(_deploy_files()))
def test_no_open_listener_without_auth(name: str) -> None:
    assert V.listener_problems(name, _deploy_files()[name]) == []


def test_ray_up_is_closed_by_default() -> None:
    config = yaml.safe_load(_deploy_files()["ray-up.yaml"])
    (head,) = [shlex.split(c) for c in config["head_start_ray_commands"] if "ray start" in c]
    assert _arg(head, "--dashboard-host") == "127.0.0.1"
    assert config["file_mounts"]["/home/ray/.ray/auth_token"] == "~/.ray/auth_token"  # Ray's default path
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        (start,) = [c for c in config[key] if "ray start" in c]
        assert "GANRAY_MLFLOW_ENV_FILE=/home/ray/.ganray/mlflow.env" in shlex.split(start)
        assert "MLFLOW_TRACKING" not in start
    assert config["file_mounts"]["/home/ray/.ganray/mlflow.env"] == "~/.ganray/mlflow.env"


def test_mlflow_image_binds_loopback_by_default() -> None:
    cmd = [line for line in _deploy_files()["Dockerfile.mlflow"].splitlines() if line.startswith("CMD ")]
    assert len(cmd) == 1 and _arg(json.loads(cmd[0][4:]), "--host") == "127.0.0.1"


_OLD_RAY_UP_START = (  # the start command ray-up.yaml had before it was closed (issue 19)
    "set -a && . /home/ray/.ganray/mlflow.env && set +a && ulimit -n 65536 && ray start --head "
    "--port=6379 --object-manager-port=8076 --autoscaling-config=~/ray_bootstrap_config.yaml "
    "--dashboard-host=0.0.0.0")


def _ray_up_edit(edit: Any) -> tuple[str, str]:
    config = yaml.safe_load(_deploy_files()["ray-up.yaml"])
    edit(config)
    return "ray-up.yaml", yaml.safe_dump(config)


def _k8s_edit(file: str, edit: Any) -> tuple[str, str]:
    docs = list(yaml.safe_load_all(_deploy_files()[file]))
    for doc in docs:
        edit(doc)
    return file, yaml.safe_dump_all(docs)


OPEN_COPIES = {
    "ray-up-old-head": (lambda: _ray_up_edit(lambda c: c.update(
        head_start_ray_commands=["ray stop", _OLD_RAY_UP_START])), "without token auth"),
    "ray-up-worker-without-token": (lambda: _ray_up_edit(lambda c: c.update(worker_start_ray_commands=[
        "ray stop", "ray start --address=$RAY_HEAD_IP:6379"])), "worker_start_ray_commands: `ray start` without"),
    "ray-up-sources-credentials": (lambda: _ray_up_edit(lambda c: c["worker_start_ray_commands"].__setitem__(
        1, "set -a && . ~/.ganray/mlflow.env && " + c["worker_start_ray_commands"][1])), "sources a file"),
    "mlflow-image-old-cmd": (lambda: ("Dockerfile.mlflow", _deploy_files()["Dockerfile.mlflow"].replace(
        '"127.0.0.1"', '"0.0.0.0"')), "without --app-name basic-auth"),
    "mlflow-k8s-without-basic-auth": (lambda: _k8s_edit("mlflow.yaml", lambda d: d["kind"] == "Deployment" and (
        a := d["spec"]["template"]["spec"]["containers"][0]["args"]).__delitem__(
        slice(a.index("--app-name"), a.index("--app-name") + 2))), "without --app-name basic-auth"),
    "raycluster-without-token": (lambda: _k8s_edit("raycluster.yaml", lambda d: d["spec"].pop("authOptions")),
                                 "dashboard on 0.0.0.0 without token auth"),
    "unrecognised-listener": (lambda: _k8s_edit("cronjob-retrain.yaml", lambda d: d["metadata"].update(
        annotations={"listen": "--host=0.0.0.0"})), "in no listener these checks know"),
}


@pytest.mark.parametrize("case", sorted(OPEN_COPIES))
def test_listener_check_fails_on_open_copies(case: str) -> None:
    make, expected = OPEN_COPIES[case]
    name, text = make()
    assert V.listener_problems(name, _deploy_files()[name]) == []
    problems = V.listener_problems(name, text)
    assert any(expected in p for p in problems), problems


def test_validate_cli_checks_listeners_of_every_deploy_file(tmp_path: Path) -> None:
    files = [DEPLOY / "ray-up.yaml", *sorted(K8S.glob("*.yaml")), DEPLOY / "Dockerfile", DEPLOY / "Dockerfile.mlflow"]
    assert V.main([*map(str, files), "--crds", str(_crds())]) == 0
    name, text = OPEN_COPIES["ray-up-old-head"][0]()
    (tmp_path / name).write_text(text)
    assert V.main([str(tmp_path / name)]) == 1
