"""Offline checks for Kubernetes manifests that run Ray through KubeRay, before `kubectl apply`.

    python deploy/validate.py deploy/k8s/*.yaml [--crds DIR]

For every RayCluster, RayJob and RayCronJob document:
- the CRD's OpenAPI schema, read from DIR (the `ray.io_*.yaml` files of KubeRay's
  ray-operator/config/crd/bases; default: deploy/schemas/kuberay-v1.7.0, kept in the
  repository with KubeRay's LICENSE), with unknown fields rejected as `kubectl apply`'s strict field validation does;
- the rules KubeRay's controller enforces after admission, which the schema does not carry (a
  RayJob with ttlSecondsAfterFinished but without shutdownAfterJobFinishes is accepted by the API
  server and then refused by the operator, for example).
For every document except Secrets: no literal credential (a password/token env var with a
`value`, a URI with a password in it).
For every file, the k8s manifests and also deploy/ray-up.yaml and deploy/Dockerfile*: no listener
on 0.0.0.0 / `::` without authentication (a Ray dashboard without token auth, `mlflow server`
without basic auth), every `ray start` of ray-up.yaml with RAY_AUTH_MODE=token and sourcing no
file into Ray's environment, and no open address these checks do not recognise.

    python deploy/validate.py deploy/k8s/*.yaml deploy/ray-up.yaml deploy/Dockerfile deploy/Dockerfile.mlflow

Exit status 0 when everything passes, 1 otherwise. Needs PyYAML and jsonschema.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import shlex
import sys
from pathlib import Path
from typing import Any, Iterator

import yaml

DEFAULT_CRDS = Path(__file__).resolve().parent / "schemas" / "kuberay-v1.7.0"
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
             "RayCronJob": "ray.io_raycronjobs.yaml"}

# KubeRay v1.7.0 facts the CRD schema does not state (ray-operator/apis/ray/v1/rayjob_types.go,
# controllers/ray/utils/validation.go and constant.go). submissionMode has no enum in the schema.
# The name limits leave room for what the operator appends: a RayJob's cluster is
# `<rayjob>-<5 chars>` and its services add more; a RayCronJob's child RayJob is
# `<cron>-<scheduled Unix minute>`.
SUBMISSION_MODES = frozenset({"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"})
MAX_NAME = {"RayCluster": 53, "RayJob": 47, "RayCronJob": 36}
MIN_TOKEN_AUTH_RAY = (2, 52, 0)
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")

SENSITIVE_KEY = re.compile(r"(?i)(pass(word|wd)?|token|secret[_-]?(access[_-]?)?key|api[_-]?key)$")
SENSITIVE_ENV = re.compile(r"(?i)(PASSWORD|PASSWD|TOKEN|SECRET|ACCESS_KEY|API_KEY|CREDENTIAL)")
URI_WITH_PASSWORD = re.compile(r"\b[a-z][a-z0-9+.\-]*://[^\s/:@]+:[^\s/@]+@")


def load_docs(path: Path) -> list[dict[str, Any]]:
    """All non-empty YAML documents of a manifest file."""
    return [d for d in yaml.safe_load_all(Path(path).read_text()) if d is not None]


def walk(node: Any) -> Iterator[Any]:
    """Every node of a YAML tree, depth first."""
    yield node
    children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
    for child in children:
        yield from walk(child)


def containers(doc: Any) -> list[dict[str, Any]]:
    """Every container spec in a document (pod templates at any depth)."""
    return [c for n in walk(doc) if isinstance(n, dict) and isinstance(n.get("containers"), list)
            for c in n["containers"]]


# ---------------------------------------------------------------------------------------------
# CRD schemas


def to_jsonschema(node: Any) -> Any:
    """Translate a structural CRD schema (OpenAPI v3) into JSON Schema with the API server's
    semantics: `x-kubernetes-int-or-string` accepts an integer or a string, `nullable` admits
    null, and an object that lists its properties rejects unknown fields unless it is marked
    `x-kubernetes-preserve-unknown-fields`. CEL rules (`x-kubernetes-validations`) are dropped:
    evaluating them needs a CEL engine."""
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-") or key == "nullable":
            continue
        if key in ("properties", "patternProperties"):
            # Property names are data, not keywords: a field called `items` stays a field.
            out[key] = {name: to_jsonschema(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(value, dict):
            out[key] = to_jsonschema(value)
        elif key in ("anyOf", "allOf", "oneOf"):
            out[key] = [to_jsonschema(sub) for sub in value]
        else:
            out[key] = value
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if node.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    if ("properties" in out and "additionalProperties" not in out
            and not node.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@functools.cache
def crd_validator(crd_dir: Path, kind: str, api_version: str) -> Any:
    """A jsonschema validator for one kind at one served version (e.g. `ray.io/v1`)."""
    import jsonschema

    crd = yaml.load((Path(crd_dir) / CRD_FILES[kind]).read_text(),
                    Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # 1 MB files: use libyaml
    group, _, version = api_version.partition("/")
    if crd["spec"]["group"] != group or crd["spec"]["names"]["kind"] != kind:
        raise ValueError(f"{CRD_FILES[kind]} does not define {kind} in group {group}")
    served = [v for v in crd["spec"]["versions"] if v["name"] == version and v.get("served")]
    if not served:
        raise ValueError(f"the {kind} CRD serves no version {version!r}")
    # OpenAPI 3.0's schema object follows JSON Schema draft 4 (boolean exclusive bounds etc.).
    return jsonschema.Draft4Validator(to_jsonschema(served[0]["schema"]["openAPIV3Schema"]))


def schema_errors(doc: dict[str, Any], crd_dir: Path) -> list[str]:
    """Schema violations of a KubeRay document, one line each with its path."""
    validator = crd_validator(Path(crd_dir), doc["kind"], doc["apiVersion"])
    return sorted(f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
                  for e in validator.iter_errors(doc))


# ---------------------------------------------------------------------------------------------
# Controller rules


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


def cluster_rules(spec: dict[str, Any], where: str) -> list[str]:
    """RayClusterSpec checks of KubeRay's ValidateRayClusterSpec."""
    errors = []
    head = spec.get("headGroupSpec", {})
    if not head.get("template", {}).get("spec", {}).get("containers"):
        errors.append(f"{where}: headGroupSpec needs at least one container")
    workers = spec.get("workerGroupSpecs", [])
    for name, group in [("head", head)] + [(g.get("groupName", "?"), g) for g in workers]:
        params = group.get("rayStartParams", {})
        if "labels" in params:
            errors.append(f"{where}: group {name}: rayStartParams.labels is not supported; use labels")
        if group.get("resources") and any(params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")):
            errors.append(f"{where}: group {name}: resources set both in rayStartParams and resources")
    names = [g.get("groupName") for g in workers]
    if len(names) != len(set(names)):
        errors.append(f"{where}: worker group names are not unique")
    for group in workers:
        low, high = group.get("minReplicas", 0), group.get("maxReplicas", 2**31 - 1)
        if not low <= group.get("replicas", low) <= high:
            errors.append(f"{where}: group {group.get('groupName')}: needs minReplicas <= replicas <= maxReplicas")
    if spec.get("authOptions", {}).get("mode") == "token" and _version(spec.get("rayVersion", "0")) < MIN_TOKEN_AUTH_RAY:
        errors.append(f"{where}: authOptions.mode token needs rayVersion >= 2.52.0")
    return errors


def job_rules(spec: dict[str, Any], where: str) -> list[str]:
    """RayJobSpec checks of KubeRay's ValidateRayJobSpec (also applied to a RayCronJob's template)."""
    errors = []
    mode = spec.get("submissionMode", "K8sJobMode")
    shutdown = spec.get("shutdownAfterJobFinishes", False)
    ttl = spec.get("ttlSecondsAfterFinished", 0)
    selector = spec.get("clusterSelector")
    if mode not in SUBMISSION_MODES:
        errors.append(f"{where}: submissionMode {mode!r} is not one of {sorted(SUBMISSION_MODES)}")
    if ttl > 0 and not shutdown:
        errors.append(f"{where}: ttlSecondsAfterFinished needs shutdownAfterJobFinishes: true")
    if ttl < 0:
        errors.append(f"{where}: ttlSecondsAfterFinished must be >= 0")
    if spec.get("suspend") and not shutdown:
        errors.append(f"{where}: suspend needs shutdownAfterJobFinishes: true")
    if not spec.get("rayClusterSpec") and not selector:
        errors.append(f"{where}: one of rayClusterSpec or clusterSelector must be set")
    if selector is not None and not selector.get("ray.io/cluster"):
        errors.append(f"{where}: clusterSelector needs the ray.io/cluster key")
    if selector and mode == "SidecarMode":
        errors.append(f"{where}: clusterSelector is not supported in SidecarMode")
    if mode == "InteractiveMode" and spec.get("backoffLimit", 0) > 0:
        errors.append(f"{where}: backoffLimit is incompatible with InteractiveMode")
    if "activeDeadlineSeconds" in spec and spec["activeDeadlineSeconds"] <= 0:
        errors.append(f"{where}: activeDeadlineSeconds must be positive")
    if spec.get("rayClusterSpec"):
        errors += cluster_rules(spec["rayClusterSpec"], where + ".rayClusterSpec")
    return errors


def controller_rule_violations(doc: dict[str, Any]) -> list[str]:
    """What KubeRay's operator would refuse in a RayCluster, RayJob or RayCronJob."""
    kind, name = doc["kind"], doc["metadata"]["name"]
    errors = []
    if len(name) > MAX_NAME[kind] or not DNS1035.match(name):
        errors.append(f"{kind} name {name!r}: a DNS-1035 label of at most {MAX_NAME[kind]} characters")
    spec = doc.get("spec", {})
    if kind == "RayCluster":
        errors += cluster_rules(spec, name)
    elif kind == "RayJob":
        errors += job_rules(spec, name)
    elif kind == "RayCronJob":
        schedule = spec.get("schedule", "")
        if "TZ" in schedule or len(schedule.split()) != 5:
            errors.append(f"{name}: schedule must be five cron fields without TZ= (use timeZone)")
        if "timeZone" in spec and not spec["timeZone"]:
            errors.append(f"{name}: timeZone must not be empty")
        errors += job_rules(spec.get("jobTemplate", {}), name + ".jobTemplate")
    return errors


# ---------------------------------------------------------------------------------------------
# Credentials


def credential_leaks(doc: Any) -> list[str]:
    """Literal credentials: env vars with sensitive names and a `value`, mapping keys with
    sensitive names and a string value, and URIs with a password in them."""
    leaks = []
    for node in walk(doc):
        if isinstance(node, dict):
            name = node.get("name")
            if isinstance(name, str) and node.get("value") and SENSITIVE_ENV.search(name):
                leaks.append(f"env {name} has a literal value")
            leaks += [f"key {k} has a literal value" for k, v in node.items()
                      if isinstance(v, str) and v and SENSITIVE_KEY.search(k)]
        elif isinstance(node, str) and (match := URI_WITH_PASSWORD.search(node)):
            leaks.append(f"URI with a password: {match.group(0)}")
    return leaks


# ---------------------------------------------------------------------------------------------
# Listeners: closed by default

OPEN_HOSTS = {"0.0.0.0", "::", "[::]"}
_OPEN_TEXT = re.compile(r"0\.0\.0\.0|(?<![\w:])\[?::\]?(?![\w:])")


def flag_value(argv: list[str], flag: str) -> str | None:
    """The value of `flag` in a command line (`--flag value` or `--flag=value`), or None."""
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def _mlflow_listener(where: str, argv: list[str]) -> tuple[int, list[str]]:
    """(open listeners seen, problems) for one command line, if it is `mlflow server`."""
    host = flag_value(argv, "--host")
    if argv[:2] != ["mlflow", "server"] or host not in OPEN_HOSTS:
        return 0, []
    if flag_value(argv, "--app-name") == "basic-auth":
        return 1, []
    return 1, [f"{where}: mlflow server listens on {host} without --app-name basic-auth"]


def _ray_up_listeners(config: dict[str, Any]) -> tuple[int, list[str]]:
    opened, problems = 0, []
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in config.get(key) or [] if "ray start" in c]
        if not starts:
            problems.append(f"{key} has no `ray start`")
        for command in starts:
            argv = shlex.split(command)
            token = "RAY_AUTH_MODE=token" in argv
            if not token:
                problems.append(f"{key}: `ray start` without RAY_AUTH_MODE=token")
            if any(a in (".", "source") for a in argv):
                problems.append(f"{key}: sources a file into every Ray process's environment")
            host = flag_value(argv, "--dashboard-host")
            if host in OPEN_HOSTS:
                opened += 1
                if not token:
                    problems.append(f"{key}: dashboard on {host} without token auth")
    return opened, problems


def _manifest_listeners(docs: list[Any]) -> tuple[int, list[str]]:
    opened, problems = 0, []
    for node in (n for doc in docs for n in walk(doc) if isinstance(n, dict)):
        if "headGroupSpec" in node:  # a Ray cluster spec (RayCluster, or inside a RayJob/RayCronJob)
            groups = [node["headGroupSpec"], *(node.get("workerGroupSpecs") or [])]
            token = (node.get("authOptions") or {}).get("mode") == "token" or all(
                {"name": "RAY_AUTH_MODE", "value": "token"} in c.get("env", []) for c in containers(groups))
            for group in groups:
                host = (group.get("rayStartParams") or {}).get("dashboard-host")
                if host in OPEN_HOSTS:
                    opened += 1
                    if not token:
                        problems.append(f"dashboard on {host} without token auth")
        if isinstance(node.get("containers"), list):
            for c in node["containers"]:
                seen, found = _mlflow_listener(f"container {c.get('name')}", [*c.get("command", []), *c.get("args", [])])
                opened, problems = opened + seen, problems + found
    return opened, problems


def _dockerfile_listeners(text: str) -> tuple[int, list[str]]:
    opened, problems = 0, []
    for line in text.splitlines():
        instruction, _, rest = line.strip().partition(" ")
        if instruction in ("CMD", "ENTRYPOINT"):
            argv = json.loads(rest) if rest.strip().startswith("[") else shlex.split(rest)
            seen, found = _mlflow_listener(instruction, argv)
            opened, problems = opened + seen, problems + found
    return opened, problems


def listener_problems(name: str, text: str) -> list[str]:
    """Open (0.0.0.0 / ::) listeners without authentication in one deploy file (`name` picks the
    reader: ray-up.yaml, Dockerfile*, else a k8s manifest), and open addresses the readers do not
    recognise: a new kind of listener must be taught here rather than slip by."""
    if name == "ray-up.yaml":
        opened, problems = _ray_up_listeners(yaml.safe_load(text))
    elif name.startswith("Dockerfile"):
        opened, problems = _dockerfile_listeners(text)
    else:
        opened, problems = _manifest_listeners([d for d in yaml.safe_load_all(text) if d is not None])
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    unexplained = len(_OPEN_TEXT.findall(code)) - opened
    if unexplained > 0:
        problems.append(f"{unexplained} open address(es) (0.0.0.0 / ::) in no listener these checks know")
    return problems


def check_file(path: Path, crd_dir: Path | None) -> list[str]:
    """Every problem found in one deploy file, prefixed with the document it concerns."""
    problems = [f"{path}: {p}" for p in listener_problems(path.name, path.read_text())]
    if path.name == "ray-up.yaml" or path.name.startswith("Dockerfile"):
        return problems
    for doc in load_docs(path):
        where = f"{path}: {doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        if doc.get("kind") in CRD_FILES:
            if crd_dir is not None:
                problems += [f"{where}: schema: {e}" for e in schema_errors(doc, crd_dir)]
            problems += [f"{where}: {e}" for e in controller_rule_violations(doc)]
        if doc.get("kind") != "Secret":
            problems += [f"{where}: {e}" for e in credential_leaks(doc)]
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", type=Path, help="manifest files (multi-document YAML), ray-up.yaml, Dockerfiles")
    parser.add_argument("--crds", type=Path, default=DEFAULT_CRDS,
                        help="folder with KubeRay's ray.io_*.yaml CRDs (default: %(default)s)")
    args = parser.parse_args(argv)
    crd_dir = args.crds if args.crds.is_dir() else None
    if crd_dir is None:
        print(f"note: no CRDs at {args.crds}; schema checks skipped (pass --crds DIR)", file=sys.stderr)
    problems = [p for f in args.files for p in check_file(f, crd_dir)]
    for problem in problems:
        print(problem)
    print(f"{len(args.files)} file(s), {len(problems)} problem(s)", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
