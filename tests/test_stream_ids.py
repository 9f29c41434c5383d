"""felix.quic.stream_ids: the four stream types of RFC 9000, section 2.1."""

from __future__ import annotations

import pytest

from felix.quic.stream_ids import is_client_initiated, is_server_initiated, is_unidirectional


@pytest.mark.parametrize(
    ("stream_id", "server", "uni"),
    [
        (0, False, False),
        (1, True, False),
        (2, False, True),
        (3, True, True),
        (4 * 9 + 3, True, True),
    ],
)
def test_stream_types(stream_id: int, server: bool, uni: bool) -> None:
    assert is_server_initiated(stream_id) is server
    assert is_client_initiated(stream_id) is not server
    assert is_unidirectional(stream_id) is uni
