"""The new-job form, generated from the training config schema (``loft.core.specs.TrainConfig``):
one field per key, grouped by section, each with its default and its description, and the way
back from the submitted fields to a config document.

A field is named by its key path (``training.lr``). Only fields whose value differs from the
schema's default go into the document, so a job's config says what its submitter chose and
inherits the defaults of the loft that runs it, as a hand-written config does. Values are read
as ``loft train --set KEY=VALUE`` reads them (YAML scalars, ``[a, b]`` lists, ``null``), except
text fields, which stay text.
"""

from __future__ import annotations

import enum
import types
import typing
from dataclasses import dataclass
from functools import cache
from typing import Any, Literal

import yaml
from pydantic import BaseModel

from loft.core.specs import TrainConfig

SKIPPED = ("output_dir",)  # the worker sets it: the job's own folder
OPEN_SECTIONS = ("model", "data", "lora", "training")
# the sections first in the form; the others follow in the schema's order
ORDER = ("model", "data", "lora", "training", "training.distributed")


@dataclass(frozen=True)
class Field:
    key: str  # the key path, also the form field's name
    section: str  # "model" for top-level keys, else the nested model's key path
    kind: str  # text | number | select | lines (a list, one item per line)
    default: str  # as the form shows it; "" for none
    description: str
    choices: tuple[str, ...] = ()
    required: bool = False
    nullable: bool = False
    integer: bool = False
    text: bool = False  # a str value: never read as YAML

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key, "section": self.section, "kind": self.kind,
            "default": self.default, "description": self.description,
            "choices": list(self.choices), "required": self.required,
        }  # fmt: skip


@dataclass(frozen=True)
class Section:
    key: str
    title: str
    description: str
    fields: tuple[Field, ...]
    open: bool


def _shown(value: Any) -> str:
    if value is None or isinstance(value, BaseModel):
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, list):
        return "\n".join(str(v) for v in value)
    return str(value)


def _args(ann: Any) -> tuple[Any, ...]:
    if typing.get_origin(ann) in (typing.Union, types.UnionType):
        return typing.get_args(ann)
    return (ann,)


def _model(ann: Any) -> type[BaseModel] | None:
    for a in _args(ann):
        if isinstance(a, type) and issubclass(a, BaseModel):
            return a
    return None


def _field(key: str, section: str, info: Any) -> Field | None:
    ann = info.annotation
    parts = [a for a in _args(ann) if a is not type(None)]
    nullable = len(parts) < len(_args(ann))
    default = None if info.is_required() else info.get_default(call_default_factory=True)
    common = {"key": key, "section": section, "default": _shown(default),
              "description": info.description or "", "required": info.is_required(),
              "nullable": nullable}  # fmt: skip
    choices: list[str] = []
    for a in parts:
        if typing.get_origin(a) is Literal:
            choices += [str(v) for v in typing.get_args(a)]
        elif isinstance(a, type) and issubclass(a, enum.Enum):
            choices += [str(m.value) for m in a]
        elif a is bool:
            choices += ["true", "false"]
        else:
            choices = []
            break
    if choices:
        return Field(kind="select", choices=tuple(choices), **common)
    if parts == [int] or parts == [float]:
        return Field(kind="number", integer=parts == [int], **common)
    if typing.get_origin(parts[0]) is list and len(parts) == 1:
        return Field(kind="lines", **common)
    if parts == [str]:
        return Field(kind="text", text=True, **common)
    if str in parts:  # str | list[str]: a name, or a [a, b] list
        return Field(kind="text", **common)
    return None  # a mapping (data.column_map): set it in a config file


def _walk(model: type[BaseModel], prefix: str, section: str, out: dict[str, list[Field]]) -> None:
    for name, info in model.model_fields.items():
        key = f"{prefix}{name}"
        if key in SKIPPED:
            continue
        sub = _model(info.annotation)
        if sub is not None:
            if bool in _args(info.annotation):  # register: a section that may be switched off
                out.setdefault(key, []).append(
                    Field(
                        key=key,
                        section=key,
                        kind="select",
                        choices=("true", "false"),
                        default="true",
                        description=info.description or "",
                    )  # fmt: skip
                )
            out.setdefault(key, [])
            _walk(sub, key + ".", key, out)
            continue
        where = section if prefix else ("gate" if name == "gate" else "model")
        f = _field(key, where, info)
        if f is not None:
            out.setdefault(where, []).append(f)


@cache
def sections() -> tuple[Section, ...]:
    """The form's sections in order: the model first, then each nested part of the config."""
    found: dict[str, list[Field]] = {key: [] for key in ORDER}
    _walk(TrainConfig, "", "model", found)
    out = []
    for key, fields in found.items():
        if not fields:
            continue
        info = _section_info(key)
        out.append(Section(key, key if key != "model" else "model and method", info,
                           tuple(fields), key in OPEN_SECTIONS))  # fmt: skip
    return tuple(out)


def _section_info(key: str) -> str:
    model: Any = TrainConfig
    info = None
    for part in key.split("."):
        info = model.model_fields.get(part) if model is not None else None
        model = _model(info.annotation) if info is not None else None
    return (info.description or "") if info is not None and key != "model" else ""


def fields() -> dict[str, Field]:
    return {f.key: f for s in sections() for f in s.fields}


def _value(f: Field, raw: str) -> Any:
    if f.kind == "select":
        return {"true": True, "false": False}.get(raw, raw)
    if f.text:
        return None if raw == "null" and f.nullable else raw
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    if f.kind == "number" and isinstance(value, str):  # YAML reads 1e-3 as text
        try:
            number = float(raw)
        except ValueError:
            return raw  # the schema's check says what is wrong with it
        return int(number) if f.integer and number.is_integer() else number
    return value


def to_doc(values: dict[str, str]) -> dict[str, Any]:
    """The config document the submitted ``values`` (key path -> text) describe: the fields that
    differ from their defaults. Unknown names are ignored (the form's other fields)."""
    doc: dict[str, Any] = {}
    known = fields()
    off = {k for k, f in known.items() if f.kind == "select" and f.section == k
           and values.get(k, f.default).strip() == "false"}  # fmt: skip
    for key, f in known.items():
        raw = values.get(key)
        if raw is None:
            continue
        if key in off:
            _put(doc, key, False)
            continue
        if any(key.startswith(o + ".") for o in off) or f.section == key:
            continue
        if f.kind == "lines":
            items = [line.strip() for line in raw.splitlines() if line.strip()]
            if items != [line for line in f.default.splitlines() if line]:
                _put(doc, key, items)
            continue
        raw = raw.strip()
        if raw == f.default or (raw == "" and not f.required):
            continue
        _put(doc, key, _value(f, raw))
    return doc


def _put(doc: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = doc
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def from_doc(doc: dict[str, Any]) -> dict[str, str]:
    """The form's values for a config document (to show a submitted config again)."""
    out: dict[str, str] = {}
    for key in fields():
        node: Any = doc
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None and not isinstance(node, dict):
            out[key] = _shown(node)
    return out


__all__ = ["Field", "Section", "fields", "from_doc", "sections", "to_doc"]
