"""A raw QUIC peer for broker tests: sends any bytes, collects frames per stream."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from pathlib import Path

from felix import wire
from felix.quic import ConnectionHandler, StreamTransport, connect, load_engine


class RawPeer(ConnectionHandler):
    """Collects frames per stream; remembers ends and resets."""

    def __init__(self, transport: StreamTransport) -> None:
        super().__init__(transport)
        self.readers: dict[int, wire.FrameReader] = defaultdict(
            lambda: wire.FrameReader(1 << 24, accept_flags=wire.FLAGS_ALL)
        )
        self.frames: dict[int, list[wire.Frame]] = defaultdict(list)
        self.ended: set[int] = set()
        self.changed = asyncio.Event()

    def _on_stream_data(self, stream_id: int, data: bytes, end_stream: bool) -> None:
        reader = self.readers[stream_id]
        reader.feed(data)
        self.frames[stream_id].extend(reader)
        if end_stream:
            self.ended.add(stream_id)
        self.changed.set()

    def _on_stop_sending(self, stream_id: int, error_code: int) -> None:
        self.ended.add(stream_id)
        self.changed.set()

    def _on_stream_reset(self, stream_id: int, error_code: int) -> None:
        self.ended.add(stream_id)
        self.changed.set()

    def _on_connection_terminated(
        self, error_code: int, frame_type: int | None, reason_phrase: str
    ) -> None:
        self.changed.set()

    def send(self, stream_id: int, data: bytes, end_stream: bool = False) -> None:
        self.send_stream_data(stream_id, data, end_stream)

    def new_stream(self, unidirectional: bool = False) -> int:
        return self.next_stream_id(unidirectional)

    async def wait_for(self, predicate, timeout: float = 5.0) -> None:
        async def loop() -> None:
            while not predicate():
                self.changed.clear()
                await self.changed.wait()

        await asyncio.wait_for(loop(), timeout)

    async def frames_on(self, stream_id: int, n: int, timeout: float = 5.0) -> list[wire.Frame]:
        await self.wait_for(lambda: len(self.frames[stream_id]) >= n, timeout)
        return self.frames[stream_id][:n]

    async def auth(self, tenant: str = "acme", flags: int | None = wire.FLAGS_ALL) -> int:
        """Open a control stream and authenticate; returns the stream id."""
        sid = self.new_stream()
        msg: dict[str, object] = {"type": "auth", "tenant_id": tenant, "token": ""}
        if flags is not None:
            msg["client_flags"] = flags
        self.send(sid, wire.encode_message(msg))
        await self.frames_on(sid, 1)
        return sid


async def raw_connect(host: str, port: int, ca_file: Path, engine: str | None = None) -> RawPeer:
    quic = load_engine(engine)
    config = quic.client_configuration(ca_file=ca_file, server_name=host)
    return await connect(quic, host, port, configuration=config, create_handler=RawPeer)
