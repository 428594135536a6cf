"""The text side of a job config: YAML files, `--set dotted.key=value` overrides, dotted keys,
and pydantic's validation errors as one line naming the key (config.py holds the schema)."""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any, Optional

import yaml
from pydantic import BaseModel, ValidationError

from ganray.models.errors import ConfigError


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as dotted keys (`model.kwargs` stays one value)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value and key != "kwargs":
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a", "b", "c"], value parsed as a YAML scalar)."""
    if "=" not in text:
        raise ConfigError(f"--set '{text}' is not of the form dotted.key=value, e.g. --set schedule.total_kimg=100")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set '{text}' has an empty key; write e.g. --set topology.num_workers=2")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw  # not valid YAML: take the text as a string, pydantic will judge it
    return key.split("."), value


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    tree = copy.deepcopy(tree)
    for text in overrides or []:
        path, value = parse_override(text)
        node = tree
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {'.'.join(path)}: '{'.'.join(path[:i + 1])}' is a value, not a section")
            node = child
        node[path[-1]] = value
    return tree


def _closest_key(model: type[BaseModel], path: tuple[Any, ...], bad: str) -> Optional[str]:
    """The valid key nearest to an unknown one, walking the model tree along `path`."""
    cls: Any = model
    for part in path:
        field = getattr(cls, "model_fields", {}).get(part)
        if field is None:
            return None
        ann = field.annotation
        # Optional[Section] -> Section
        for arg in getattr(ann, "__args__", ()) or ():
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                ann = arg
        cls = ann
    names = list(getattr(cls, "model_fields", {}).keys())
    match = difflib.get_close_matches(bad, names, n=1, cutoff=0.5)
    return match[0] if match else None


def format_validation_error(err: ValidationError, model: type[BaseModel]) -> str:
    """The first problem pydantic found, as one line naming the dotted key (and the closest valid
    one for an unknown key)."""
    first = err.errors()[0]
    loc = tuple(first.get("loc", ()))
    dotted = ".".join(str(p) for p in loc) or "config"
    kind = first.get("type", "")
    if kind == "extra_forbidden":
        hint = _closest_key(model, loc[:-1], str(loc[-1]))
        where = ".".join(str(p) for p in loc[:-1]) or "the top level"
        msg = f"unknown key '{dotted}' in {where}"
        return msg + (f"; did you mean '{'.'.join([*map(str, loc[:-1]), hint])}'?" if hint else "; remove it")
    ctx = first.get("ctx") or {}
    got = first.get("input")
    got_text = "" if isinstance(got, dict) else f" (got {got!r})"
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        bound = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}[kind]
        return f"{dotted} must be {bound} {next(iter(ctx.values()))}{got_text}"
    if kind == "literal_error":
        return f"{dotted} must be one of {ctx.get('expected')}{got_text}"
    if kind == "value_error":
        return str(ctx.get("error", first.get("msg")))
    if kind == "missing":
        return f"{dotted} is required"
    return f"{dotted}: {first.get('msg', 'invalid value').lower()}{got_text}"


def read_yaml_file(path: str | Path, what: str, example: str) -> Any:
    """The parsed YAML of the `what` file at `path` (e.g. "config", "search"); a missing file,
    bad YAML or a binary file is a one-line ConfigError naming `example` as a file that works."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} file '{p}' does not exist; pass a YAML file such as {example}")
    try:
        return yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{what} file '{p}' is not valid YAML{where}; fix its syntax") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{what} file '{p}' is not a text file; pass a YAML {what}") from None
