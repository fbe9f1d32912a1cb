"""The config references in `loft train --help` and `loft serve --help`, made from the schema.

``config_reference`` renders a pydantic config model as annotated YAML: every key, nested models
expanded in place, with its default and, as a comment, its ``Field`` description (led by the
allowed values of a Literal or Enum when the description does not name them). Both commands call
it on their schema (``TrainConfig``, ``ServeConfig``), so the help lists exactly the keys the
config loader accepts and cannot drift from it.

The reference is built only when a help page that shows it is printed: commands write
``{schema:TrainConfig}`` in their help and use ``SchemaHelpCommand`` / ``SchemaHelpGroup``, so
starting ``loft`` never imports pydantic or the schema (and never torch, mlflow, ...).
"""

from __future__ import annotations

import enum
import json
import re
import textwrap
import types
import typing
from typing import Any, Literal

from typer.core import TyperCommand, TyperGroup

if typing.TYPE_CHECKING:
    from pydantic import BaseModel
    from pydantic.fields import FieldInfo

REQUIRED = "<required>"
WIDTH = 98  # longest line; typer prints help text indented by one column
COMMENT_COL = 38  # where comments start, unless the key and value are longer
_PLAIN = re.compile(r"^[A-Za-z0-9_./<>@+-][A-Za-z0-9_./<>@+ -]*$")
_YAML_WORDS = {"null", "true", "false", "yes", "no", "on", "off", "~", ""}
_SCHEMA = re.compile(r"\{schema:(\w+)\}")


class _SchemaHelp:
    """Help text whose ``{schema:NAME}`` marks become ``help_block(loft.core.specs.NAME)`` on
    first read; the one-line summary in `loft --help` comes from the text before them."""

    _raw_help: str | None = None
    _short_help: str | None = None

    @property
    def help(self) -> str | None:
        text = self._raw_help
        if text and _SCHEMA.search(text):
            from loft.core import specs

            text = _SCHEMA.sub(lambda m: help_block(getattr(specs, m[1])), text)
            self._raw_help = text
        return text

    @help.setter
    def help(self, value: str | None) -> None:
        self._raw_help = value

    @property
    def short_help(self) -> str | None:
        if self._short_help or not self._raw_help:
            return self._short_help
        return self._raw_help.split("\n\n", 1)[0].strip()

    @short_help.setter
    def short_help(self, value: str | None) -> None:
        self._short_help = value


class SchemaHelpCommand(_SchemaHelp, TyperCommand):
    """A typer command whose help may embed ``{schema:NAME}``."""


class SchemaHelpGroup(_SchemaHelp, TyperGroup):
    """A typer group whose help may embed ``{schema:NAME}``."""


def config_reference(model: type[BaseModel], *, width: int = WIDTH) -> str:
    """Every key of ``model`` as ``key: default  # description`` lines, nested by indentation."""
    rows: list[tuple[str, str]] = []
    _collect(model, 1, rows)
    col = min(COMMENT_COL, max(len(left) for left, _ in rows) + 2)
    lines = []
    for left, comment in rows:
        if not comment:
            lines.append(left)
            continue
        start = max(col, len(left) + 2)
        wrapped = textwrap.wrap(comment, max(24, width - start - 2)) or [""]
        lines.append(f"{left.ljust(start)}# {wrapped[0]}")
        lines.extend(f"{' ' * start}# {more}" for more in wrapped[1:])
    return "\n".join(lines)


def help_block(model: type[BaseModel]) -> str:
    """``config_reference`` as a paragraph of typer help: kept as is, rich markup escaped."""
    from rich.markup import escape

    return "\b\n" + escape(config_reference(model))


def _collect(model: type[BaseModel], depth: int, rows: list[tuple[str, str]]) -> None:
    pad = "  " * depth
    for name, field in model.model_fields.items():
        comment = _comment(field)
        sub = _submodel(field.annotation)
        if sub is not None:
            if field.is_required():
                comment = f"{comment.rstrip('.')} (required).".lstrip()
            rows.append((f"{pad}{name}:", comment))
            _collect(sub, depth + 1, rows)
        else:
            rows.append((f"{pad}{name}: {_default(field)}", comment))


def _union_args(annotation: Any) -> list[Any]:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [a for arg in typing.get_args(annotation) for a in _union_args(arg)]
    return [annotation]


def _submodel(annotation: Any) -> type[BaseModel] | None:
    from pydantic import BaseModel

    for arg in _union_args(annotation):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def _choices(annotation: Any) -> list[str]:
    out: list[str] = []
    args = _union_args(annotation)
    for arg in args:
        if typing.get_origin(arg) is Literal:
            out += [str(_scalar(a)) for a in typing.get_args(arg)]
        elif isinstance(arg, type) and issubclass(arg, enum.Enum):
            out += [str(m.value) for m in arg]
    if out and bool in args:
        out = ["true", "false", *out]
    return out


def _comment(field: FieldInfo) -> str:
    desc = (field.description or "").strip()
    choices = _choices(field.annotation)
    if choices and not all(re.search(rf"\b{re.escape(c)}\b", desc) for c in choices):
        lead = " | ".join(choices)
        desc = f"{lead}. {desc}" if desc else lead
    return desc


def _default(field: FieldInfo) -> str:
    from pydantic_core import PydanticUndefined

    if field.is_required():
        return REQUIRED
    if field.default_factory is not None:
        return _value(field.default_factory())  # type: ignore[call-arg]
    if field.default is PydanticUndefined:
        return REQUIRED
    return _value(field.default)


def _scalar(v: Any) -> Any:
    return v.value if isinstance(v, enum.Enum) else v


def _value(v: Any) -> str:
    v = _scalar(v)
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        text = repr(v)
        if "e" in text:  # 1e-05 -> 1.0e-5, which YAML reads as a number
            mantissa, exp = text.split("e")
            mantissa = mantissa if "." in mantissa else f"{mantissa}.0"
            text = f"{mantissa}e{int(exp)}"
        return text
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        plain = _PLAIN.match(v) and v.lower() not in _YAML_WORDS and not _is_number(v)
        return v if plain else json.dumps(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_value(x)}" for k, x in v.items()) + "}"
    if hasattr(v, "model_dump"):
        return "{" + ", ".join(f"{k}: {_value(x)}" for k, x in v.model_dump().items()) + "}"
    return str(v)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
