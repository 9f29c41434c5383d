"""End-to-end encryption without a broker: keys and key files, what a sealed record binds
(the stream and the user headers, not the felix-* headers bridges and dead letters
add), and that nothing that fails to open ever reads as plaintext."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest

import felix
from felix.client import E2EKeys, E2EState
from felix.client._e2e import open_record, open_value, seal_record, seal_value
from felix.client._flow import Message
from felix.errors import ConfigError, E2EError, LocalProtocolError

K1 = bytes(range(32))
K2 = bytes(range(32, 64))
STREAM = "acme/prod/orders"


def keys(**kw: object) -> E2EKeys:
    return E2EKeys({"k1": K1, "k2": K2}, "k2", **kw)  # type: ignore[arg-type]


def write_key_file(path: Path, doc: object, mode: int = 0o600) -> Path:
    path.write_text(json.dumps(doc))
    path.chmod(mode)
    return path


def b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


# -- keys ----------------------------------------------------------------------------------


def test_keys_need_32_bytes_a_known_current_id_and_plain_ids() -> None:
    with pytest.raises(ConfigError, match="exactly 32 bytes, got 16"):
        E2EKeys({"k1": bytes(16)}, "k1")
    with pytest.raises(ConfigError, match="exactly 32 bytes, got str"):
        E2EKeys({"k1": "x" * 32}, "k1")  # type: ignore[dict-item]
    with pytest.raises(ConfigError, match="current key id 'k9' is not among"):
        E2EKeys({"k1": K1}, "k9")
    with pytest.raises(ConfigError, match="non-empty mapping"):
        E2EKeys({}, "k1")
    for bad in ("", "a b", "é", "x" * 65, "k\n"):
        with pytest.raises(ConfigError, match="key id"):
            E2EKeys({bad: K1}, bad)
    with pytest.raises(ConfigError, match="at most 256 keys"):
        E2EKeys({f"k{i}": K1 for i in range(257)}, "k1")
    with pytest.raises(ConfigError, match=r"e2e must be felix\.E2EKeys"):
        felix.ClientOptions(e2e={"k1": K1})  # type: ignore[arg-type]


def test_keys_never_show_in_repr() -> None:
    text = repr(keys()) + repr(felix.ClientOptions(e2e=keys()))
    assert "k2" in text
    for key in (K1, K2):
        assert repr(key) not in text and key.hex() not in text and b64(key) not in text


def test_key_file_loads_and_must_be_private(tmp_path: Path) -> None:
    doc = {"current": "2026-12", "keys": {"2026-11": b64(K1), "2026-12": b64(K2)}}
    path = write_key_file(tmp_path / "e2e.json", doc)
    loaded = E2EKeys.from_file(path)
    assert loaded.current == "2026-12" and loaded.key_ids == {"2026-11", "2026-12"}
    assert loaded.require
    sealed, headers = seal_record(loaded, STREAM, b"hi", None)
    assert open_record(E2EKeys({"x": K2}, "x"), "o", 0, STREAM, sealed, headers).error is not None
    assert headers["felix-e2e-key"] == "2026-12"
    for mode in (0o640, 0o604, 0o660, 0o644):
        path.chmod(mode)
        with pytest.raises(ConfigError, match=rf"mode {mode:04o}\); run chmod 600"):
            E2EKeys.from_file(path)
    path.chmod(0o400)
    assert E2EKeys.from_file(path, require=False).require is False


@pytest.mark.parametrize(
    ("doc", "match"),
    [
        ({"current": "k1", "keys": {"k1": b64(bytes(16))}}, "exactly 32 bytes, got 16"),
        ({"current": "k1", "keys": {"k1": b64(bytes(33))}}, "exactly 32 bytes, got 33"),
        ({"current": "k1", "keys": {"k1": "not base64!"}}, "key 'k1' is not base64"),
        ({"current": "k1", "keys": {"k1": 7}}, "not a base64 string"),
        ({"current": "k2", "keys": {"k1": b64(K1)}}, "current key id 'k2'"),
        ({"keys": {"k1": b64(K1)}}, "expected"),
        ([b64(K1)], "expected"),
        ({"current": "k1", "keys": {}}, "non-empty"),
    ],
)
def test_bad_key_files_are_config_errors(tmp_path: Path, doc: object, match: str) -> None:
    path = write_key_file(tmp_path / "e2e.json", doc)
    with pytest.raises(ConfigError, match=match) as info:
        E2EKeys.from_file(path)
    assert str(path) in str(info.value)


def test_missing_unreadable_and_non_json_key_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="No such file"):
        E2EKeys.from_file(tmp_path / "missing.json")
    (tmp_path / "dir").mkdir(mode=0o700)
    with pytest.raises(ConfigError, match=r"Is a directory|not a regular file"):
        E2EKeys.from_file(tmp_path / "dir")
    os.mkfifo(tmp_path / "fifo", 0o600)
    with pytest.raises(ConfigError, match="not a regular file"):
        E2EKeys.from_file(tmp_path / "fifo")
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"\xff\xfe{")
    garbage.chmod(0o600)
    with pytest.raises(ConfigError, match="not JSON"):
        E2EKeys.from_file(garbage)
    big = tmp_path / "big"
    big.write_bytes(b" " * ((1 << 20) + 1))
    big.chmod(0o600)
    with pytest.raises(ConfigError, match="larger than"):
        E2EKeys.from_file(big)
    if os.geteuid() != 0:  # root reads anything
        locked = write_key_file(tmp_path / "locked", {}, mode=0o000)
        with pytest.raises(ConfigError, match="Permission denied"):
            E2EKeys.from_file(locked)


# -- records ---------------------------------------------------------------------------------


def test_a_sealed_record_opens_to_its_plaintext_and_binds_stream_and_user_headers() -> None:
    k = keys()
    sealed, headers = seal_record(k, STREAM, b"secret order", {"type": "order", "n": "1"})
    assert headers == {
        "type": "order",
        "n": "1",
        "felix-e2e-key": "k2",
        "felix-e2e-alg": "A256GCM",
    }
    assert b"secret" not in sealed and len(sealed) == 12 + len(b"secret order") + 16
    opened = open_record(k, "orders", 5, STREAM, sealed, headers)
    assert opened.plaintext == b"secret order" and opened.stream == STREAM
    # Same plaintext twice: a fresh nonce, another ciphertext.
    assert (
        seal_record(k, STREAM, b"secret order", None)[0]
        != seal_record(k, STREAM, b"secret order", None)[0]
    )

    def fails(payload: bytes, hdrs: dict[str, str], stream: str = STREAM) -> str:
        result = open_record(k, "orders", 5, stream, payload, hdrs)
        assert result.plaintext is None and result.error is not None
        assert "record 5 of 'orders'" in str(result.error)
        return result.error.reason

    flipped = bytearray(sealed)
    flipped[20] ^= 1
    assert fails(bytes(flipped), headers) == "tampered"  # ciphertext
    nonce = bytearray(sealed)
    nonce[0] ^= 1
    assert fails(bytes(nonce), headers) == "tampered"  # nonce
    tag = bytearray(sealed)
    tag[-1] ^= 1
    assert fails(bytes(tag), headers) == "tampered"  # tag
    assert fails(sealed[:27], headers) == "tampered"  # truncated
    assert fails(sealed, {**headers, "type": "refund"}) == "tampered"  # bound header changed
    assert fails(sealed, {**headers, "extra": "1"}) == "tampered"  # header added
    assert fails(sealed, {k: v for k, v in headers.items() if k != "n"}) == "tampered"
    assert fails(sealed, headers, "acme/prod/refunds") == "tampered"  # replayed elsewhere
    assert fails(sealed, headers, "other/prod/orders") == "tampered"  # another tenant
    assert fails(sealed, {**headers, "felix-e2e-key": "k1"}) == "tampered"  # other key
    assert fails(sealed, {**headers, "felix-e2e-key": "k7"}) == "unknown_key"
    assert fails(sealed, {**headers, "felix-e2e-alg": "A128GCM"}) == "unsupported"


def test_felix_headers_added_on_the_way_do_not_break_opening() -> None:
    """A bridge adds felix-source-* and rewrites felix-msg-id; a dead letter carries
    felix-dlq-*; a replay adds felix-replayed-from: none of those is bound."""
    k = keys()
    sealed, headers = seal_record(k, STREAM, b"x", {"type": "a", "felix-msg-id": "p-1"})
    bridged = {
        **headers,
        "felix-msg-id": "bridge:eu-1/acme/prod/orders@7",
        "felix-source-region": "eu-1",
        "felix-source-stream": STREAM,
        "felix-source-offset": "7",
    }
    # Bridged to a stream of another name (or tenant): its provenance names the original.
    opened = open_record(k, "copy", 0, "acme/dr/orders-copy", sealed, bridged)
    assert opened.plaintext == b"x" and opened.stream == STREAM
    dead = {**headers, "felix-dlq-stream": STREAM, "felix-dlq-reason": "term"}
    opened = open_record(k, "orders.dlq", 0, "acme/prod/orders.dlq", sealed, dead)
    assert opened.plaintext == b"x" and opened.stream == STREAM
    replayed = {**headers, "felix-replayed-from": "acme/prod/orders.dlq@0"}
    assert open_record(k, "orders", 9, STREAM, sealed, replayed).plaintext == b"x"
    # Provenance headers only widen where the record may come from, and the stream that
    # authenticated is reported: a lie about it does not open.
    liar = {**headers, "felix-source-stream": "acme/prod/refunds"}
    assert open_record(k, "r", 0, "acme/prod/refunds", sealed, liar).error is not None


def test_the_publisher_cannot_set_the_e2e_headers_itself() -> None:
    with pytest.raises(ConfigError, match="felix-e2e-key"):
        seal_record(keys(), STREAM, b"x", {"felix-e2e-key": "k1"})


def test_require_decides_about_plaintext_records() -> None:
    strict = open_record(keys(), "orders", 3, STREAM, b"plain", {"a": "b"})
    assert strict.error is not None and strict.error.reason == "not_encrypted"
    lax = open_record(keys(require=False), "orders", 3, STREAM, b"plain", {})
    assert lax.error is None and lax.plaintext is None


def test_rotation_old_records_still_open_new_ones_use_the_current_key() -> None:
    old = E2EKeys({"k1": K1}, "k1")
    sealed, headers = seal_record(old, STREAM, b"before", None)
    rotated = keys()  # k1 and k2, current k2
    assert open_record(rotated, "o", 0, STREAM, sealed, headers).plaintext == b"before"
    sealed2, headers2 = seal_record(rotated, STREAM, b"after", None)
    assert headers2["felix-e2e-key"] == "k2"
    gone = open_record(old, "o", 1, STREAM, sealed2, headers2)
    assert gone.error is not None and gone.error.reason == "unknown_key"


def test_a_message_that_failed_never_reads_as_plaintext() -> None:
    k = keys()
    sealed, headers = seal_record(k, STREAM, b"secret", None)
    good = Message(
        "orders", 0, sealed, headers, open_record(k, "orders", 0, STREAM, sealed, headers)
    )
    assert good.data == b"secret" and good.raw == sealed and good.e2e is E2EState.DECRYPTED
    assert good.e2e_stream == STREAM and good.e2e_error is None
    bad = Message(
        "orders", 1, sealed, headers, open_record(k, "orders", 1, "x/y/z", sealed, headers)
    )
    assert bad.e2e is E2EState.FAILED and bad.e2e_error is not None
    with pytest.raises(E2EError, match="failed authentication") as info:
        bad.data  # noqa: B018
    assert info.value.reason == "tampered" and bad.raw == sealed
    # A client without keys: the record as stored, marked encrypted.
    passthrough = Message("orders", 2, sealed, headers)
    assert passthrough.data == sealed and passthrough.e2e is E2EState.ENCRYPTED
    assert Message("orders", 3, b"p", {}).e2e is E2EState.PLAIN


# -- cache values ----------------------------------------------------------------------------


def test_cache_values_bind_cache_and_key() -> None:
    k = keys()
    cache = "acme/prod/sessions"
    value = seal_value(k, cache, "user:1", b"token-123")
    assert value.startswith(b"FXE1\x02k2") and b"token" not in value
    assert open_value(k, "sessions", cache, "user:1", value) == b"token-123"
    for other_cache, other_key in ((cache, "user:2"), ("acme/prod/other", "user:1")):
        with pytest.raises(E2EError, match="failed authentication") as info:
            open_value(k, "sessions", other_cache, other_key, value)
        assert info.value.reason == "tampered"
    flipped = bytearray(value)
    flipped[-3] ^= 1
    with pytest.raises(E2EError, match="failed authentication"):
        open_value(k, "sessions", cache, "user:1", bytes(flipped))
    with pytest.raises(E2EError, match="truncated"):
        open_value(k, "sessions", cache, "user:1", value[:20])
    with pytest.raises(E2EError, match="unknown key 'k2'"):
        open_value(E2EKeys({"k1": K1}, "k1"), "sessions", cache, "user:1", value)
    with pytest.raises(E2EError, match="not end-to-end encrypted") as info:
        open_value(k, "sessions", cache, "user:1", b"plain")
    assert info.value.reason == "not_encrypted"
    assert open_value(keys(require=False), "s", cache, "user:1", b"plain") == b"plain"
    with pytest.raises(E2EError, match="unknown key"):
        open_value(k, "sessions", cache, "user:1", b"FXE1")


def test_error_texts_clip_what_the_record_writer_chose() -> None:
    sealed, headers = seal_record(keys(), STREAM, b"x", None)
    opened = open_record(keys(), "o", 0, STREAM, sealed, {**headers, "felix-e2e-key": "k" * 5000})
    assert opened.error is not None and opened.error.reason == "unknown_key"
    assert len(str(opened.error)) < 200


def test_what_the_wire_cannot_carry_is_a_local_protocol_error() -> None:
    with pytest.raises(LocalProtocolError, match="header is not encodable"):
        seal_record(keys(), STREAM, b"x", {"a": "\udc80"})
    with pytest.raises(LocalProtocolError, match="key is not encodable"):
        seal_value(keys(), "t/n/c", "\udc80", b"v")
    with pytest.raises(LocalProtocolError, match="bytes-like"):
        seal_value(keys(), "t/n/c", "k", "text")  # type: ignore[arg-type]
