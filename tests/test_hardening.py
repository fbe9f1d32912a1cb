"""What users hand loft is checked before it is used (issue 20, "interfaces fuzzed"): names that
climb out of their folder, symlinks and special files in folders, malformed safetensors headers,
uploads named to escape the catalog, the portal's static route. Oversized uploads (413) are in
tests/test_portal_datasets.py, Parquet decompression bombs in tests/test_properties_readers.py."""

from __future__ import annotations

import contextlib
import json
import os
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loft.core import safety
from loft.core.errors import ConfigError, IntegrityError

pytestmark = pytest.mark.unit


def safetensors_bytes(tensors: dict[str, dict], data: bytes, meta: dict | None = None) -> bytes:
    header = dict(tensors)
    if meta is not None:
        header["__metadata__"] = meta
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


GOOD = safetensors_bytes(
    {
        "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
        "b": {"dtype": "BF16", "shape": [4], "data_offsets": [24, 32]},
    },
    bytes(32),
    {"format": "pt"},
)


def check(data: bytes) -> dict:
    return safety.check_safetensors_header(data, len(data), where="w.safetensors")


# ------------------------------------------------------------------------------ names


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("../secrets.jsonl", "leaves its folder"),
        ("data/../../x", "leaves its folder"),
        ("/etc/passwd", "absolute path"),
        ("C:\\Windows\\x", "absolute path"),
        ("..\\..\\x", "leaves its folder"),
        ("a\x00b", "NUL"),
        ("", "empty"),
    ],
)
def test_a_name_that_escapes_its_folder_is_refused(tmp_path: Path, name: str, why: str) -> None:
    with pytest.raises(ConfigError, match=why):
        safety.inside(tmp_path, name, what="member name")


def test_a_name_through_a_symlink_out_of_the_folder_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "out").symlink_to(tmp_path)
    with pytest.raises(ConfigError, match=r"outside .* \(through a symlink\)"):
        safety.inside(root, "out/x.txt")
    assert safety.inside(root, "sub/x.txt") == root.resolve() / "sub" / "x.txt"


@pytest.mark.parametrize("name", ["../x", "a/b", "/abs", "..", "x..y/..", ""])
def test_dataset_and_model_names_cannot_be_paths(name: str) -> None:
    from loft.data.catalog import check_name as dataset_name
    from loft.registry.names import check_name as model_name

    for check_name in (dataset_name, model_name):
        with pytest.raises(ConfigError, match="invalid"):
            check_name(name)


# ----------------------------------------------------------------------------- folders


def _folder(tmp_path: Path) -> Path:
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_bytes(GOOD)
    (folder / "adapter_config.json").write_text("{}")
    return folder


def test_a_clean_folder_lists_its_files(tmp_path: Path) -> None:
    folder = _folder(tmp_path)
    (folder / "sub").mkdir()
    (folder / "sub" / "x.json").write_text("{}")
    assert safety.check_tree(folder) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "sub/x.json",
    ]


@pytest.mark.parametrize("target", ["file", "dir", "dangling"])
def test_a_symlink_in_a_folder_is_refused(tmp_path: Path, target: str) -> None:
    folder = _folder(tmp_path)
    secret = tmp_path / "secret"
    if target == "file":
        secret.write_text("root:x:0:0")
    elif target == "dir":
        secret.mkdir()
    link = folder / ("tokenizer.json" if target != "dir" else "extra")
    link.symlink_to(secret)
    with pytest.raises(ConfigError, match=rf"contains a symlink, {link.name} -> {secret}") as e:
        safety.check_tree(folder, what="the folder to register")
    assert "cp -L" in e.value.hint


def test_a_fifo_in_a_folder_is_refused(tmp_path: Path) -> None:
    folder = _folder(tmp_path)
    os.mkfifo(folder / "pipe")
    with pytest.raises(ConfigError, match="pipe, which is not a regular file"):
        safety.check_tree(folder)


def test_a_malformed_weights_file_in_a_folder_is_refused(tmp_path: Path) -> None:
    folder = _folder(tmp_path)
    (folder / "adapter_model.safetensors").write_bytes(GOOD + b"trailing")
    with pytest.raises(IntegrityError, match="adapter_model.safetensors: not a valid safet"):
        safety.check_tree(folder)


def test_registering_a_folder_with_a_symlink_is_refused(loft_home: Path, tmp_path: Path) -> None:
    """`loft registry register DIR` with a symlink in DIR copies nothing and says why."""
    from helpers import run_cli
    from loft import registry

    folder = _folder(tmp_path)
    (folder / "tokenizer.json").symlink_to(tmp_path / "elsewhere.json")
    (tmp_path / "elsewhere.json").write_text("{}")
    assert run_cli("registry", "register", str(folder), "--name", "linked") == 2
    with pytest.raises(ConfigError, match="contains a symlink, tokenizer.json"):
        registry.register(folder, name="linked")
    assert not (loft_home / "registry" / "linked").exists()


# -------------------------------------------------------------------- safetensors headers


def test_a_valid_header_passes() -> None:
    tensors = check(GOOD)
    assert tensors["a"]["shape"] == [2, 3] and "__metadata__" not in tensors


@pytest.mark.parametrize(
    ("tensors", "data", "why"),
    [
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(9), "trailing"),
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            bytes(12),
            "overlaps",
        ),
        (
            {
                "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]},
            },
            bytes(12),
            "gap",
        ),
        ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8), "needs 12"),
        ({"a": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 2]}}, bytes(2), "dtype"),
        # found by bench/fuzz.py (atheris): a list as dtype was a TypeError (unhashable)
        ({"a": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}, bytes(4), "dtype"),
        ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}, b"", "shape"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, bytes(8), "needs 8"),
        ({"a": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, bytes(4), "shape"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0]}}, bytes(4), "data_offsets"),
        ({"a": [1, 2]}, b"", "not an object"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, bytes(2), "truncated"),
    ],
)
def test_malformed_headers_are_refused(tensors: dict, data: bytes, why: str) -> None:
    with pytest.raises(IntegrityError, match=why):
        check(safetensors_bytes(tensors, data))


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"\x01\x00", "shorter than its 8-byte"),
        (struct.pack("<Q", 2**40) + b"{}", "outside 2.."),
        (struct.pack("<Q", 50) + b"{}", "runs past the end"),
        (struct.pack("<Q", 2) + b"[]", "does not start with"),
        (struct.pack("<Q", 3) + b"{\xff}", "not UTF-8 JSON"),
        (safetensors_bytes({}, b"", {"format": 1}), "__metadata__"),
    ],
)
def test_malformed_files_are_refused(data: bytes, why: str) -> None:
    with pytest.raises(IntegrityError, match=why):
        check(data)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(at=st.integers(0, len(GOOD) - 1), byte=st.integers(0, 255))
def test_any_byte_flip_is_refused_or_still_consistent(at: int, byte: int) -> None:
    """Every single-byte change of a valid file: IntegrityError, or a header still consistent
    (e.g. a changed tensor name or a changed data byte); never another exception."""
    data = bytearray(GOOD)
    data[at] = byte
    try:
        tensors = check(bytes(data))
    except IntegrityError:
        return
    n = struct.unpack("<Q", bytes(data[:8]))[0]
    assert sum(t["data_offsets"][1] - t["data_offsets"][0] for t in tensors.values()) == (
        len(data) - 8 - n
    )


@settings(max_examples=300, deadline=None, derandomize=True)
@given(blob=st.binary(max_size=200))
def test_any_bytes_are_refused_or_a_header(blob: bytes) -> None:
    with contextlib.suppress(IntegrityError):
        check(blob)


def test_the_header_agrees_with_the_safetensors_library(tmp_path: Path) -> None:
    import numpy as np
    from safetensors.numpy import save_file

    path = tmp_path / "w.safetensors"
    arrays = {"x": np.zeros((3, 5), np.float16), "y": np.ones(7, np.int64), "z": np.zeros(0)}
    save_file(arrays, str(path), metadata={"k": "v"})
    tensors = safety.read_safetensors_header(path)
    assert {k: v["shape"] for k, v in tensors.items()} == {"x": [3, 5], "y": [7], "z": [0]}


# -------------------------------------------------------------------------- the portal


@pytest.fixture(scope="module")
def portal(tmp_path_factory: pytest.TempPathFactory):
    from portal_client import portal_for

    with portal_for(tmp_path_factory.mktemp("hardening") / "home") as p:
        yield p


@pytest.mark.parametrize(
    "filename", ["../../../../escaped.jsonl", "/tmp/escaped.jsonl", "..\\..\\escaped.jsonl"]
)
def test_an_upload_named_to_escape_stays_inside_the_catalog(portal, filename: str) -> None:
    row = (
        b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}'
    )
    client = portal.client()
    r = client.post(
        "/api/datasets/escape",
        files={"file": (filename, row + b"\n")},
        headers=portal.bearer("admin"),
    )
    assert r.status_code == 201, r.text
    assert r.json()["source"]["filename"] == "escaped.jsonl"
    assert not Path("/tmp/escaped.jsonl").exists()
    assert not (portal.home.parent / "escaped.jsonl").exists()
    assert not list(portal.home.parent.parent.glob("escaped.jsonl"))


@pytest.mark.parametrize(
    "path",
    [
        "/static/../portal.db",
        "/static/%2e%2e/portal.db",
        "/static/%2e%2e%2f%2e%2e%2fportal.db",
        "/static/..%2f..%2fsettings.yaml",
        "/static//etc/passwd",
    ],
)
def test_the_static_route_serves_nothing_outside_its_folder(portal, path: str) -> None:
    r = portal.client().get(path)
    assert r.status_code == 404, (path, r.status_code, r.text[:200])
    assert b"SQLite" not in r.content and b"root:" not in r.content
