"""Names, aliases and version references, validated so nothing a user names can escape LOFT_HOME."""

from __future__ import annotations

import re
from pathlib import Path

from loft.core.errors import ConfigError
from loft.core.paths import loft_home

NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9._-]{0,63}$")
# MLflow allows only word characters and '-' in aliases; 'latest' and 'v<N>' are reserved by it.
ALIAS_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_-]{0,63}$")
_RESERVED_ALIAS = re.compile(r"^(latest|v\d+)$", re.IGNORECASE)
_VERSION_RE = re.compile(r"^[1-9][0-9]{0,8}$")
_REF_HINT = "A model reference is NAME, NAME@ALIAS or NAME:VERSION (e.g. support-bot@champion)."


def check_name(name: str) -> str:
    """``name`` if it is a valid registered-model name, else ConfigError saying why."""
    if not isinstance(name, str) or not NAME_RE.match(name) or ".." in name:
        raise ConfigError(
            f"invalid model name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting "
            "with a letter or digit, with no path separators and no '..'.",
            hint="Pass --name with a plain name such as support-bot.",
        )
    return name


def check_alias(alias: str) -> str:
    """``alias`` if it is a valid alias, else ConfigError saying why."""
    if not isinstance(alias, str) or not ALIAS_RE.match(alias) or _RESERVED_ALIAS.match(alias):
        raise ConfigError(
            f"invalid alias {alias!r}: use 1-64 letters, digits, '_' or '-', starting with a "
            "letter or digit; 'latest' and 'v<number>' are reserved by MLflow.",
            hint="Common aliases: champion, candidate, staging.",
        )
    return alias


def parse_version(text: str) -> int:
    if not _VERSION_RE.match(text):
        raise ConfigError(
            f"invalid version {text!r}: a version is a positive whole number such as 3.",
            hint=_REF_HINT,
        )
    return int(text)


def parse_ref(ref: str) -> tuple[str, str | None, int | None]:
    """Split ``name``, ``name@alias`` or ``name:3`` into (name, alias, version), strictly."""
    if not isinstance(ref, str) or not ref.strip():
        raise ConfigError("empty model reference.", hint=_REF_HINT)
    ref = ref.strip()
    if "@" in ref and ":" in ref:
        raise ConfigError(f"model reference {ref!r} has both '@' and ':'.", hint=_REF_HINT)
    if "@" in ref:
        name, _, alias = ref.partition("@")
        return check_name(name), check_alias(alias), None
    if ":" in ref:
        name, _, version = ref.partition(":")
        return check_name(name), None, parse_version(version)
    return check_name(ref), None, None


def sanitise_name(raw: str) -> str:
    """A valid model name derived from a run or folder name (invalid characters become '-')."""
    name = re.sub(r"[^a-zA-Z0-9._-]+", "-", raw)
    name = re.sub(r"\.{2,}", ".", name)
    name = re.sub(r"^[^a-zA-Z0-9]+", "", name)[:64].rstrip(".-_")
    if not name:
        raise ConfigError(
            f"cannot derive a model name from {raw!r}.", hint="Pass --name with a plain name."
        )
    return check_name(name)


def registry_root() -> Path:
    root = loft_home() / "registry"
    root.mkdir(parents=True, exist_ok=True)
    return root


def model_dir(name: str) -> Path:
    return registry_root() / check_name(name)


def version_dir(name: str, version: int) -> Path:
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ConfigError(f"invalid version {version!r}: a version is a positive whole number.")
    return model_dir(name) / str(version)
