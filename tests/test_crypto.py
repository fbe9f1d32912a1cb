"""The encryption framing of loft.core.crypto: round trips, every single-byte flip refused; cut,
dropped, swapped, appended and spliced chunks refused; wrong KEK refused; KEK checks; rewrap."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loft.core import crypto
from loft.core.errors import ConfigError, IntegrityError

pytestmark = pytest.mark.unit

H, TAG = crypto.HEADER_SIZE, crypto.TAG
KEY = crypto.FileKey(bytes(range(32)))
OTHER = crypto.FileKey(bytes(range(1, 33)))


def chunks(blob: bytes, cs: int) -> list[bytes]:
    body = blob[H:]
    return [body[i : i + cs + TAG] for i in range(0, len(body), cs + TAG)]


@pytest.mark.parametrize("size", [0, 1, 64, 65, 64 * 3, 64 * 3 + 7])
def test_round_trip_sizes(size: int, tmp_path: Path) -> None:
    data = os.urandom(size)
    blob = crypto.encrypt_bytes(data, KEY, chunk_size=64)
    n_chunks = max(1, -(-size // 64))
    assert len(blob) == H + size + n_chunks * TAG
    assert crypto.decrypt_bytes(blob, KEY) == data
    path = tmp_path / "f"
    path.write_bytes(blob)
    assert crypto.is_encrypted(path) and crypto.decrypt_file(path, KEY) == data
    assert crypto.plain_size(path) == size
    assert crypto.plain_digest(path, KEY)[1] == size


def test_default_chunk_size_multi_chunk() -> None:
    data = os.urandom(crypto.CHUNK_SIZE * 2 + 3)
    blob = crypto.encrypt_bytes(data, KEY)
    assert len(blob) == H + len(data) + 3 * TAG
    assert crypto.decrypt_bytes(blob, KEY) == data


def test_every_single_byte_flip_is_refused() -> None:
    data = os.urandom(100)
    blob = crypto.encrypt_bytes(data, KEY, chunk_size=32)  # 4 chunks, 512 + 100 + 64 bytes
    assert len(blob) == H + 100 + 4 * TAG
    for i in range(len(blob)):
        bad = bytearray(blob)
        bad[i] ^= 0x01
        with pytest.raises(IntegrityError):
            crypto.decrypt_bytes(bytes(bad), KEY)
        bad[i] ^= 0xFF  # another value in the same place
        with pytest.raises(IntegrityError):
            crypto.decrypt_bytes(bytes(bad), KEY)


def test_cut_dropped_swapped_appended_chunks_refused() -> None:
    cs = 16
    data = os.urandom(cs * 4 + 5)
    blob = crypto.encrypt_bytes(data, KEY, chunk_size=cs)
    head, parts = blob[:H], chunks(blob, cs)
    assert len(parts) == 5
    cases = {
        "cut at a chunk boundary": head + b"".join(parts[:3]),
        "cut mid-chunk": blob[:-3],
        "cut to the header": head,
        "last chunk dropped": head + b"".join(parts[:4]),
        "middle chunk dropped": head + b"".join(parts[:1] + parts[2:]),
        "chunks swapped": head + b"".join([parts[1], parts[0], *parts[2:]]),
        "chunk duplicated": head + b"".join([parts[0], parts[0], *parts[1:]]),
        "chunk appended": blob + parts[0],
        "bytes appended": blob + b"\0" * TAG,
    }
    for what, bad in cases.items():
        with pytest.raises(IntegrityError):
            crypto.decrypt_bytes(bad, KEY, name=what)


def test_chunk_from_another_file_refused() -> None:
    cs = 16
    data = os.urandom(cs * 3)
    a = crypto.encrypt_bytes(data, KEY, chunk_size=cs)
    b = crypto.encrypt_bytes(data, KEY, chunk_size=cs)  # same plaintext, same KEK
    pa, pb = chunks(a, cs), chunks(b, cs)
    with pytest.raises(IntegrityError, match="chunk 1 of 3"):
        crypto.decrypt_bytes(a[:H] + pa[0] + pb[1] + pa[2], KEY, name="spliced")
    with pytest.raises(IntegrityError):  # b's header on a's chunks
        crypto.decrypt_bytes(b[:H] + a[H:], KEY)


def test_wrong_kek_refused_and_named(tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(crypto.encrypt_bytes(b"secret", KEY))
    with pytest.raises(IntegrityError) as e:
        crypto.decrypt_file(path, OTHER)
    assert str(path) in str(e.value) and KEY.key_id in str(e.value)
    assert OTHER.key_id in str(e.value)


def test_same_key_id_but_different_key_refused() -> None:
    class Impostor(crypto.FileKey):
        @property
        def key_id(self) -> str:
            return KEY.key_id

    with pytest.raises(IntegrityError, match="does not unwrap"):
        crypto.decrypt_bytes(crypto.encrypt_bytes(b"x", KEY), Impostor(bytes(32)))


def test_failure_names_file_and_chunk(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    blob = bytearray(crypto.encrypt_bytes(os.urandom(50), KEY, chunk_size=16))
    blob[H + 2 * (16 + TAG) + 1] ^= 1  # inside chunk 2
    path.write_bytes(bytes(blob))
    with pytest.raises(IntegrityError, match=r"a\.safetensors: chunk 2 of 4"):
        crypto.decrypt_file(path, KEY)


def test_read_range_decrypts_only_what_it_needs(tmp_path: Path) -> None:
    data = os.urandom(1000)
    path = tmp_path / "f"
    path.write_bytes(crypto.encrypt_bytes(data, KEY, chunk_size=64))
    for off, n in [(0, 1), (63, 2), (64, 64), (100, 500), (990, 100), (1000, 5), (0, 1000)]:
        assert crypto.read_range(path, off, n, KEY) == data[off : off + n]
    # a flip in chunk 10 leaves a read of chunk 0 working and a read of chunk 10 refused
    blob = bytearray(path.read_bytes())
    blob[H + 10 * (64 + TAG)] ^= 1
    path.write_bytes(bytes(blob))
    assert crypto.read_range(path, 0, 64, KEY) == data[:64]
    with pytest.raises(IntegrityError, match="chunk 10 of 16"):
        crypto.read_range(path, 640, 10, KEY)


def test_read_range_on_a_cut_file_refused(tmp_path: Path) -> None:
    blob = crypto.encrypt_bytes(os.urandom(200), KEY, chunk_size=64)
    path = tmp_path / "f"
    path.write_bytes(blob[: H + 2 * (64 + TAG)])  # two whole chunks, neither final
    with pytest.raises(IntegrityError):
        crypto.read_range(path, 64, 64, KEY)
    with pytest.raises(IntegrityError):
        crypto.read_range(path, 500, 10, KEY)


@settings(max_examples=60, deadline=None)
@given(data=st.binary(max_size=700), cs=st.integers(1, 300))
def test_framing_round_trips(data: bytes, cs: int) -> None:
    blob = crypto.encrypt_bytes(data, KEY, chunk_size=cs)
    assert len(blob) == H + len(data) + max(1, -(-len(data) // cs)) * TAG
    assert crypto.decrypt_bytes(blob, KEY) == data


@settings(max_examples=60, deadline=None)
@given(data=st.binary(min_size=1, max_size=300), cs=st.integers(1, 64), where=st.data())
def test_framing_any_cut_or_flip_refused(data: bytes, cs: int, where: st.DataObject) -> None:
    blob = crypto.encrypt_bytes(data, KEY, chunk_size=cs)
    cut = where.draw(st.integers(0, len(blob) - 1), label="cut")
    with pytest.raises(IntegrityError):
        crypto.decrypt_bytes(blob[:cut], KEY)
    i = where.draw(st.integers(0, len(blob) - 1), label="flip")
    bit = where.draw(st.integers(0, 7), label="bit")
    bad = bytearray(blob)
    bad[i] ^= 1 << bit
    with pytest.raises(IntegrityError):
        crypto.decrypt_bytes(bytes(bad), KEY)


def test_encrypt_file_in_place_is_atomic_and_idempotent(tmp_path: Path) -> None:
    path = tmp_path / "adapter.bin"
    data = os.urandom(3000)
    path.write_bytes(data)
    assert crypto.encrypt_file(path, KEY, chunk_size=1024) is True
    assert crypto.is_encrypted(path) and data[:64] not in path.read_bytes()
    assert crypto.encrypt_file(path, KEY) is False  # never encrypted twice
    assert crypto.read_plain(path, KEY) == data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.bin"]  # no temp left behind


def test_rewrap_changes_only_the_header(tmp_path: Path) -> None:
    path = tmp_path / "f"
    data = os.urandom(5000)
    path.write_bytes(crypto.encrypt_bytes(data, KEY, chunk_size=1000))
    before = path.read_bytes()
    assert crypto.rewrap(path, KEY, OTHER) is True
    after = path.read_bytes()
    assert after[H:] == before[H:] and after[:H] != before[:H]
    assert crypto.read_header(path).key_id == OTHER.key_id
    assert crypto.decrypt_file(path, OTHER) == data
    with pytest.raises(IntegrityError):
        crypto.decrypt_file(path, KEY)
    assert crypto.rewrap(path, KEY, OTHER) is False  # resumable: already done
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]
    third = crypto.FileKey(os.urandom(32))
    with pytest.raises(IntegrityError, match="neither the old"):
        crypto.rewrap(path, third, crypto.FileKey(os.urandom(32)))


def test_rewrap_replays_its_journal_after_a_torn_header(tmp_path: Path) -> None:
    path = tmp_path / "f"
    data = os.urandom(300)
    path.write_bytes(crypto.encrypt_bytes(data, KEY, chunk_size=100))
    # a crash after the journal was written and half the new header was: replay it
    new_head = crypto.rewrap_header(path.read_bytes()[:H], KEY, OTHER, where="f")
    assert new_head is not None
    (tmp_path / ".f.rewrap").write_bytes(new_head)
    torn = bytearray(path.read_bytes())
    torn[:40] = new_head[:40]  # the new key id, half the wrapped key
    path.write_bytes(bytes(torn))
    with pytest.raises(IntegrityError):
        crypto.decrypt_file(path, OTHER)
    assert crypto.rewrap(path, KEY, OTHER) is True
    assert crypto.decrypt_file(path, OTHER) == data
    assert not (tmp_path / ".f.rewrap").exists()


def test_rewrap_bytes_for_object_stores() -> None:
    blob = crypto.encrypt_bytes(b"abc" * 100, KEY, chunk_size=64)
    out = crypto.rewrap_bytes(blob, KEY, OTHER, name="s3://b/k")
    assert out is not None and out[H:] == blob[H:]
    assert crypto.decrypt_bytes(out, OTHER) == b"abc" * 100
    assert crypto.rewrap_bytes(out, KEY, OTHER, name="s3://b/k") is None


# ----------------------------------------------------------------------------- KEK configuration


def write_kek(path: Path, data: bytes | None = None, mode: int = 0o600) -> Path:
    path.write_bytes(os.urandom(32) if data is None else data)
    path.chmod(mode)
    return path


def test_kek_file_checks(tmp_path: Path) -> None:
    good = write_kek(tmp_path / "kek")
    assert crypto.load_kek(good).key_id == crypto.FileKey(good.read_bytes()).key_id
    assert len(crypto.load_kek(good).key_id) == 16
    with pytest.raises(ConfigError, match="holds 33 bytes") as e:
        crypto.load_kek(write_kek(tmp_path / "long", os.urandom(33)))
    assert "head -c 32 /dev/urandom" in str(e.value)
    with pytest.raises(ConfigError, match="holds 64 bytes"):  # hex text is not a key
        crypto.load_kek(write_kek(tmp_path / "hex", os.urandom(32).hex().encode()))
    with pytest.raises(ConfigError, match="every user") as e:
        crypto.load_kek(write_kek(tmp_path / "open", mode=0o644))
    assert "chmod 600" in str(e.value)
    with pytest.raises(ConfigError, match="No such file"):
        crypto.load_kek(tmp_path / "absent")


def test_provider_from_env_and_settings(
    tmp_path: Path, loft_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LOFT_KEK_FILE", raising=False)
    monkeypatch.delenv("LOFT_KEY_PROVIDER", raising=False)
    assert crypto.provider() is None and not crypto.enabled()
    kek = write_kek(tmp_path / "kek")
    (loft_home / "settings.yaml").write_text(f"encryption: {{kek_file: {kek}}}\n")
    assert crypto.provider().key_id == crypto.load_kek(kek).key_id  # type: ignore[union-attr]
    other = write_kek(tmp_path / "other")
    monkeypatch.setenv("LOFT_KEK_FILE", str(other))  # the environment wins
    assert crypto.provider().key_id == crypto.load_kek(other).key_id  # type: ignore[union-attr]


def test_kms_plug_point(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_kms.py").write_text(
        "from loft.core.crypto import FileKey\n"
        "class Kms(FileKey):\n"
        "    @property\n"
        "    def key_id(self):\n"
        "        return 'arn:aws:kms:eu-west-1:1:key/abc'\n"
        "def factory():\n"
        "    return Kms(bytes(32), source='kms')\n"
        "def broken():\n"
        "    return object()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("LOFT_KEY_PROVIDER", "my_kms:factory")
    p = crypto.provider()
    assert p is not None and p.key_id.startswith("arn:aws:kms")
    blob = crypto.encrypt_bytes(b"hello", p)
    assert crypto.decrypt_bytes(blob, p) == b"hello"
    assert crypto.read_header_bytes(blob).key_id == p.key_id
    monkeypatch.setenv("LOFT_KEY_PROVIDER", "my_kms:broken")
    with pytest.raises(ConfigError, match="lacks key_id"):
        crypto.provider()
    monkeypatch.setenv("LOFT_KEY_PROVIDER", "my_kms")
    with pytest.raises(ConfigError, match="module:factory"):
        crypto.provider()


def test_encrypted_file_without_a_kek_says_what_to_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loft_home: Path
) -> None:
    monkeypatch.delenv("LOFT_KEK_FILE", raising=False)
    monkeypatch.delenv("LOFT_KEY_PROVIDER", raising=False)
    path = tmp_path / "f"
    path.write_bytes(crypto.encrypt_bytes(b"x", KEY))
    with pytest.raises(ConfigError, match="LOFT_KEK_FILE"):
        crypto.read_plain(path)
    plain = tmp_path / "p"
    plain.write_bytes(b"plain")
    assert crypto.read_plain(plain) == b"plain"


def test_tensors_are_views_of_the_decrypted_buffer() -> None:
    import torch
    from safetensors.torch import load, save

    from loft.models.memory import tensors_from_buffer

    tensors = {
        "w": torch.randn(3, 4),
        "i": torch.arange(5),
        "h": torch.randn(2, dtype=torch.bfloat16),
        "empty": torch.empty(0, 3),
        "scalar": torch.tensor(2.5),
    }
    blob = save(tensors, metadata={"format": "pt"})
    buf = bytearray(blob)
    got, want = tensors_from_buffer(buf, where="t"), load(blob)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k])
    got["w"][0, 0] = 123.0  # a view, not a copy: writing through the tensor changes the buffer
    assert tensors_from_buffer(buf, where="t")["w"][0, 0] == 123.0
    bad = bytearray(blob.replace(b'"data_offsets":[44,92]', b'"data_offsets":[44,91]', 1))
    assert bad != bytearray(blob) and len(bad) == len(blob)  # w's offsets no longer fit its shape
    with pytest.raises(ConfigError, match="not a valid safetensors"):
        tensors_from_buffer(bad, where="t")
