"""Credentials in URIs: found, masked, refused. Light (no pyarrow), for the data readers and for
the control plane's scrubbing of everything it logs (`orchestrator/tracking/store.scrub`)."""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlsplit

from ganray.models.errors import ConfigError

# Query keys that hold a secret in some URI (Azure's client_secret, SAS tokens, keys, presigned signatures).
SECRET_QUERY_KEY = re.compile(r"secret|token|passw|sas|signature|(^|_)(key|sig)$", re.IGNORECASE)


def uri_credentials(path: str) -> list[str]:
    """The parts of a data URI that carry credentials: `user:password@` (any userinfo for s3://,
    whose user is an access key id) and secret-looking query keys. Empty for a local path."""
    if "://" not in path:
        return []
    parts = urlsplit(path)
    found = []
    if "@" in parts.netloc and (parts.password is not None or parts.scheme.lower() == "s3"):
        found.append("user:password@")
    found += [key for key, _ in parse_qsl(parts.query, keep_blank_values=True) if SECRET_QUERY_KEY.search(key)]
    return found


def redacted_uri(path: str) -> str:
    """`path` without its userinfo and with secret-looking query values masked (safe to print)."""
    if "://" not in path:
        return path
    parts = urlsplit(path)
    query = "&".join(f"{k}={'***' if SECRET_QUERY_KEY.search(k) else v}"
                     for k, v in parse_qsl(parts.query, keep_blank_values=True))
    return parts._replace(netloc=parts.netloc.rpartition("@")[2], query=query).geturl()


def refuse_uri_credentials(path: str) -> None:
    """A ConfigError when data.path carries credentials (they would reach MLflow params, the run's
    config.yaml and error messages); `ganray validate` and `train` call it before any run exists."""
    found = uri_credentials(path)
    if found:
        raise ConfigError(f"data.path '{redacted_uri(path)}' carries credentials ({', '.join(found)}), and data.path "
                          "is logged to MLflow; remove them and give them through the environment (for s3:// "
                          "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE, AWS_ENDPOINT_URL)")


_QUERY_PAIR = re.compile(r"(?P<sep>[?&;])(?P<key>[A-Za-z0-9_.\-]+)=(?P<value>[^&;\s'\"]*)")


def mask_query_secrets(text: str) -> str:
    """`text` with the values of secret-looking URI query keys (`?client_secret=...`) masked."""
    return _QUERY_PAIR.sub(lambda m: f"{m['sep']}{m['key']}=***" if SECRET_QUERY_KEY.search(m["key"]) else m[0], text)
