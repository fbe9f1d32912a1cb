"""A registered version's files on disk: stored encrypted when a key-encryption key is configured,
read back decrypted in memory only.

With a KEK (``LOFT_KEK_FILE``; see :mod:`loft.core.crypto`) every file of a version is encrypted
when it is registered, except ``card.json`` (the registry's own record) and the tokenizer files
(:data:`PLAINTEXT`: the base model's vocabulary and the chat template, which the card records in
plaintext anyway). The card's sha256 and byte counts stay those of the plaintext, so
``loft registry verify`` checks what was registered, decrypting in memory as it hashes.

Every consumer (serving, eval, export, ``init_from``) reads a version through the loaders of
:mod:`loft.models.memory`, which take plaintext and encrypted files alike: JSON, tensors
(``safetensors.torch.load`` on bytes), a PEFT model built from the decrypted config and weights,
a full model from its decrypted config and state dict. Nothing writes plaintext to disk.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from loft.core import crypto

# Written and kept as plaintext: the card and the tokenizer files a runtime reads by path.
PLAINTEXT = frozenset(
    {
        "card.json",
        "DELETED.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "tokenizer.model",
        "special_tokens_map.json",
        "added_tokens.json",
        "vocab.json",
        "vocab.txt",
        "merges.txt",
        "chat_template.jinja",
        "chat_template.json",
    }
)


def should_encrypt(rel: str) -> bool:
    """Whether a version's file ``rel`` is stored encrypted when a KEK is configured."""
    return Path(rel).name not in PLAINTEXT


def store_file(src: Path, dest: Path, key: crypto.KeyProvider | None) -> None:
    """Copy ``src`` into a version folder: encrypted with a fresh data key when ``key`` is given
    and the file is not in :data:`PLAINTEXT`, else as it is. An already encrypted source is
    decrypted in memory and re-encrypted under its own new data key."""
    if key is not None and should_encrypt(dest.name):
        if crypto.is_encrypted(src):
            crypto.write_encrypted(dest, crypto.read_plain(src, key), key)
        else:
            crypto.encrypt_to(src, dest, key)
    elif crypto.is_encrypted(src):
        dest.write_bytes(crypto.read_plain(src))  # a tokenizer file: plaintext by policy
    else:
        shutil.copyfile(src, dest)


def plain_size(path: Path) -> int:
    """The plaintext size of ``path`` (its own size when it is not encrypted)."""
    return crypto.plain_size(path) if crypto.is_encrypted(path) else Path(path).stat().st_size


def encrypted(folder: Path) -> bool:
    """True when any file of ``folder`` (top level) is encrypted."""
    return any(p.is_file() and crypto.is_encrypted(p) for p in Path(folder).iterdir())


__all__ = [
    "PLAINTEXT",
    "encrypted",
    "plain_size",
    "should_encrypt",
    "store_file",
]
