"""The deployment's settings: an environment variable, else a key of ``LOFT_HOME/settings.yaml``,
else the embedded default. One file switches a team's machines to shared services:

    jobs:     {url: postgresql://loft@db.internal:5432/loft}     # or LOFT_JOBS_URL
    studies:  {url: postgresql://loft@db.internal:5432/loft}     # or LOFT_STUDIES_URL
    registry: {url: s3://loft-models/registry}                   # or LOFT_REGISTRY_URL
    artifacts: {url: s3://loft-models/mlflow}                    # or LOFT_ARTIFACTS_URL
    s3:       {endpoint_url: http://minio.internal:9000}         # or LOFT_S3_ENDPOINT_URL
    executor: {kind: ray}                                        # or LOFT_EXECUTOR
    ray:      {address: http://ray-head.internal:8265}           # or LOFT_RAY_ADDRESS
    audit:    {url: postgresql://loft@db.internal:5432/loft,     # or LOFT_AUDIT_URL (default:
               hmac_key_file: /etc/loft/audit-hmac.key}          #   jobs.url's PostgreSQL);
                                                                 # LOFT_AUDIT_HMAC_KEY_FILE
"""

from __future__ import annotations

import os
from typing import Any

from loft.core.errors import ConfigError
from loft.core.paths import loft_home


def setting(env: str, key: str) -> Any:
    """``$env`` if set, else ``key`` (a dotted path) in LOFT_HOME/settings.yaml, else None."""
    if os.environ.get(env):
        return os.environ[env]
    path = loft_home() / "settings.yaml"
    if not path.is_file():
        return None
    import yaml

    try:
        node: Any = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    for part in key.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


def positive_setting(env: str, key: str, default: float, *, most: float, expected: str) -> float:
    """A number above 0 and at most ``most`` from :func:`setting`, else ``default``; anything
    else is a ConfigError naming both places and ``expected`` (e.g. "seconds above 0 ...")."""
    raw = setting(env, key)
    if raw is None:
        return default
    try:
        value = float(raw)
    except (TypeError, ValueError):
        value = -1.0
    if not 0 < value <= most:
        raise ConfigError(f"{key} ({env} or settings.yaml) is {raw!r}; expected {expected}.")
    return value


# What a process on another machine (a Ray job, its ranks) needs of this one's environment:
# loft's settings, the tracking server, object-storage credentials, Hugging Face's switches.
FORWARDED_ENV_PREFIXES = ("LOFT_", "MLFLOW_", "AWS_", "HF_", "TRANSFORMERS_", "TOKENIZERS_")


def forwarded_env() -> dict[str, str]:
    """This process's environment variables that a remote process of the same deployment needs."""
    return {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES)}


def submit_ray_job(client: Any, submission_id: str, **job: Any) -> None:
    """``client.submit_job`` (a Ray ``JobSubmissionClient``), retried for up to 2 minutes while a
    head that just started has no job agent yet (it says "try again later"); any other refusal
    is a ConfigError naming the job."""
    import time

    deadline = time.monotonic() + 120
    while True:
        try:
            client.submit_job(submission_id=submission_id, **job)
            return
        except RuntimeError as e:
            if "try again later" not in str(e) or time.monotonic() > deadline:
                raise ConfigError(
                    f"the Ray cluster refused job {submission_id}: {str(e).splitlines()[0]}"
                ) from None
            time.sleep(1)


def redact(url: str) -> str:
    """A database URL without its password, for messages and lineage."""
    from urllib.parse import urlsplit, urlunsplit

    u = urlsplit(url)
    if u.password is None:
        return url
    netloc = f"{u.username}:***@{u.hostname}" + (f":{u.port}" if u.port else "")
    return urlunsplit(u._replace(netloc=netloc))


__all__ = ["FORWARDED_ENV_PREFIXES", "forwarded_env", "redact", "setting", "submit_ray_job"]
