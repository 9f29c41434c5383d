"""The compiled extensions are the ones loaded, not some pure-Python fallback."""

import importlib.machinery
import inspect

import felix._codec
import felix._ring
from felix import wire


def _is_extension(module: object) -> bool:
    path = getattr(module, "__file__", "") or ""
    return any(path.endswith(suffix) for suffix in importlib.machinery.EXTENSION_SUFFIXES)


def test_codec_is_compiled() -> None:
    assert _is_extension(felix._codec), felix._codec.__file__
    # The public API re-exports the compiled functions themselves.
    assert wire.decode_frame is felix._codec.decode_frame
    assert not inspect.isfunction(wire.encode_publish_batch)  # a Cython function, not Python


def test_ring_is_compiled() -> None:
    assert _is_extension(felix._ring), felix._ring.__file__


def test_logscan_is_compiled() -> None:
    import zlib

    import felix._logscan

    assert _is_extension(felix._logscan), felix._logscan.__file__
    data = bytes(range(40))
    assert felix._logscan.header_crc(data, 5) == zlib.crc32(data[5:29])
