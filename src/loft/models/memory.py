"""Loading model files into memory, decrypting the ones encrypted at rest (loft.core.crypto).

The one place serving, eval, export and training read weights and configs of an adapter or a
registered version: plaintext and encrypted files alike, decrypted in memory only, never through a
temporary file. ``load_peft`` is ``PeftModel.from_pretrained`` built from the decrypted
``adapter_config.json`` and ``adapter_model.safetensors``; ``load_model`` is
``from_pretrained(config=..., state_dict=...)`` for a full model whose files are encrypted.
"""

from __future__ import annotations

import json
import mmap
from pathlib import Path
from typing import Any

from loft.core import crypto
from loft.core.errors import ConfigError


def read_bytes(path: Path) -> bytes:
    """The plaintext of ``path``, decrypted in memory when it is encrypted."""
    return crypto.read_plain(path)


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path`` (decrypted in memory); ``{}`` when absent or not an object,
    a ConfigError naming the file when it is not JSON."""
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        doc = json.loads(read_bytes(path))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(
            f"{path} is unreadable or not valid JSON ({e}).", hint=f"Fix or restore {path}."
        ) from None
    return doc if isinstance(doc, dict) else {}


def load_tensors(path: Path, device: str = "cpu") -> dict[str, Any]:
    """The tensors of a safetensors file. A plaintext file is loaded by ``safetensors`` itself;
    an encrypted one is decrypted into one buffer and its tensors are views of that buffer
    (:func:`tensors_from_buffer`), so no second copy of the weights is made."""
    path = Path(path)
    if crypto.is_encrypted(path):
        buf = crypto.decrypt_file_buffer(path, crypto.require_provider(path))
        tensors = tensors_from_buffer(buf, where=str(path))
    else:
        from safetensors.torch import load_file

        tensors = load_file(str(path))
    return tensors if device == "cpu" else {k: v.to(device) for k, v in tensors.items()}


_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
    "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}  # fmt: skip


def tensors_from_buffer(buf: bytearray | mmap.mmap, *, where: str) -> dict[str, Any]:
    """The tensors of a safetensors file held in ``buf``, as views of it (the format: u64 header
    length, a JSON header of {name: {dtype, shape, data_offsets}}, then the data). Every offset
    is checked to lie in the buffer and to match its shape; a dtype this table lacks falls back
    to ``safetensors.torch.load`` (a copy)."""
    import math

    import torch

    bad = ConfigError(f"{where} is not a valid safetensors file.")
    if len(buf) < 8:
        raise bad
    n = int.from_bytes(buf[:8], "little")
    if 8 + n > len(buf):
        raise bad
    try:
        header = json.loads(bytes(buf[8 : 8 + n]))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise bad from None
    base, out = 8 + n, {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if meta.get("dtype") not in _DTYPES:
            from safetensors.torch import load

            return load(bytes(buf))
        dtype = getattr(torch, _DTYPES[meta["dtype"]])
        shape = [int(d) for d in meta["shape"]]
        begin, end = (int(x) for x in meta["data_offsets"])
        size = math.prod(shape) * torch.tensor([], dtype=dtype).element_size()
        if not 0 <= begin <= end <= len(buf) - base or end - begin != size:
            raise bad
        if size == 0:
            out[name] = torch.empty(shape, dtype=dtype)
        else:
            flat = torch.frombuffer(buf, dtype=dtype, count=math.prod(shape), offset=base + begin)
            out[name] = flat.view(shape)
    return out


def _peft_config(folder: Path, is_trainable: bool) -> Any:
    from peft import PeftConfig

    raw = read_json(folder / "adapter_config.json")
    raw.pop("runtime_config", None)
    if "peft_type" not in raw:
        raise ConfigError(
            f"{folder / 'adapter_config.json'} is missing or names no peft_type.",
            hint="Pass a PEFT adapter folder (adapter_config.json + adapter_model.safetensors).",
        )
    config = PeftConfig.from_peft_type(**raw)
    config.inference_mode = not is_trainable
    return config


def _load_weights(model: Any, folder: Path, adapter_name: str) -> None:
    from peft import set_peft_model_state_dict
    from peft.peft_model import PEFT_TYPE_TO_PREFIX_MAPPING

    weights = load_tensors(folder / "adapter_model.safetensors")
    result = set_peft_model_state_dict(model, weights, adapter_name=adapter_name)
    prefix = PEFT_TYPE_TO_PREFIX_MAPPING.get(model.peft_config[adapter_name].peft_type, "")
    missing = [k for k in result.missing_keys if prefix in k and adapter_name in k]
    if missing:
        raise ConfigError(
            f"{folder}: adapter_model.safetensors lacks {len(missing)} weight(s) its config "
            f"creates (first: {missing[0]}).",
            hint="The adapter files are inconsistent; re-save or re-register the adapter.",
        )


def load_peft(
    base: Any, folder: Path, *, is_trainable: bool = False, adapter_name: str = "default"
) -> Any:
    """``PeftModel.from_pretrained(base, folder)`` from memory: the config from the decrypted
    ``adapter_config.json``, the weights from the decrypted ``adapter_model.safetensors``
    (``set_peft_model_state_dict``); every adapter weight the config creates must be loaded."""
    from peft import PeftModel
    from peft.auto import MODEL_TYPE_TO_PEFT_MODEL_MAPPING

    folder = Path(folder)
    config = _peft_config(folder, is_trainable)
    cls = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(config.task_type, PeftModel)
    model = cls(base, config, adapter_name)
    _load_weights(model, folder, adapter_name)
    if is_trainable:
        model.set_requires_grad(adapter_name)
    else:
        model.eval()
    return model


def add_peft(model: Any, folder: Path, *, adapter_name: str) -> Any:
    """``model.load_adapter(folder, adapter_name)`` from memory (a second adapter, frozen)."""
    folder = Path(folder)
    model.add_adapter(adapter_name, _peft_config(folder, False))
    _load_weights(model, folder, adapter_name)
    return model


def model_config(folder: Path) -> Any:
    """The transformers config of a model folder, from its (decrypted) ``config.json``."""
    from transformers import AutoConfig

    raw = read_json(Path(folder) / "config.json")
    if "model_type" not in raw:
        raise ConfigError(f"{Path(folder) / 'config.json'} is missing or names no model_type.")
    return AutoConfig.for_model(**raw)


def load_model(folder: Path, weight_files: list[str], *, dtype: Any, **kwargs: Any) -> Any:
    """A causal LM whose config and weights may be encrypted: both decrypted in memory, the model
    built by ``from_pretrained(None, config=..., state_dict=...)`` (the same weight loading, tying
    and dtype handling as loading from a folder)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    folder = Path(folder)
    config = model_config(folder)
    state: dict[str, Any] = {}
    for rel in weight_files:
        state.update(load_tensors(folder / rel))
    kwargs.pop("use_safetensors", None)
    cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    return cls.from_pretrained(None, config=config, state_dict=state, dtype=dtype, **kwargs)


def save_tensors(path: Path, tensors: dict[str, Any], key: crypto.KeyProvider | None) -> None:
    """A safetensors file, encrypted with ``key`` when given (serialised in memory first)."""
    from safetensors.torch import save, save_file

    if key is None:
        save_file(tensors, str(path))
    else:
        crypto.write_encrypted(path, save(tensors, metadata={"format": "pt"}), key)


def save_model(model: Any, folder: Path, key: crypto.KeyProvider) -> None:
    """``model.save_pretrained(folder)`` with its weights and configs encrypted (a scratch copy
    that is only registered, so no plaintext reaches the disk): one ``model.safetensors`` with
    tied tensors stored once (the first name, as ``save_pretrained`` keeps), ``config.json``
    and ``generation_config.json``."""
    folder = Path(folder)
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    tensors: dict[str, Any] = {}
    for name, t in model.state_dict().items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if ident in seen:
            continue
        seen.add(ident)
        tensors[name] = t.detach().contiguous()
    save_tensors(folder / "model.safetensors", tensors, key)
    crypto.write_encrypted(folder / "config.json", model.config.to_json_string().encode(), key)
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        text = gen.to_json_string().encode()
        crypto.write_encrypted(folder / "generation_config.json", text, key)


def is_encrypted(path: Path) -> bool:
    """True when ``path`` is a file encrypted at rest."""
    return crypto.is_encrypted(path)


__all__ = [
    "save_model",
    "save_tensors",
    "tensors_from_buffer",
    "model_config",
    "add_peft",
    "is_encrypted",
    "load_model",
    "load_peft",
    "load_tensors",
    "read_bytes",
    "read_json",
]
