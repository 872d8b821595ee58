"""Traffic of one connection, counted where it crosses the TLS stream. No amqtt here.

Receives the connection's asyncio reader and writer (after the TLS handshake); hands
on stand-ins for them that count into the connection's `TrafficCounter` every byte
read and written (the MQTT packets inside TLS) and every PUBLISH written. PUBLISHes
received are counted by the engine as it takes them (`_on_publish`), resends of QoS 2
excluded. The session's `LiveSession.traffic` is this counter; its `snapshot` is what
the connection history stores when the session ends.

A written PUBLISH is recognised by its first byte: amqtt writes every packet it sends
with one ``write`` call (``MQTTPacket.to_stream``), and the gateway's own writes are
acknowledgements. tests/integration/test_history.py checks the counts end to end.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any, cast

from gateway.core import wire
from gateway.core.history import Traffic

_PUBLISH_NIBBLE = wire.PUBLISH << 4


class TrafficCounter:
    """Mutable counters of one connection; read them as a frozen `Traffic` with `snapshot`."""

    __slots__ = ("bytes_in", "bytes_out", "messages_in", "messages_out")

    def __init__(self) -> None:
        self.bytes_in = 0
        self.bytes_out = 0
        self.messages_in = 0
        self.messages_out = 0

    def snapshot(self) -> Traffic:
        return Traffic(self.bytes_in, self.bytes_out, self.messages_in, self.messages_out)


class _CountingReader:
    """An asyncio StreamReader that counts what is read from it."""

    def __init__(self, stream: asyncio.StreamReader, counter: TrafficCounter) -> None:
        self._stream = stream
        self._counter = counter

    async def read(self, n: int = -1) -> bytes:
        data = await self._stream.read(n)
        self._counter.bytes_in += len(data)
        return data

    async def readexactly(self, n: int) -> bytes:
        data = await self._stream.readexactly(n)
        self._counter.bytes_in += len(data)
        return data

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class _CountingWriter:
    """An asyncio StreamWriter that counts what is written to it (and the PUBLISHes)."""

    def __init__(self, stream: asyncio.StreamWriter, counter: TrafficCounter) -> None:
        self._stream = stream
        self._counter = counter
        # Called once per packet sent: bound here rather than found through __getattr__.
        self.drain = stream.drain
        self.get_extra_info = stream.get_extra_info

    def write(self, data: bytes | bytearray | memoryview) -> None:
        counter = self._counter
        counter.bytes_out += len(data)
        if data and data[0] & 0xF0 == _PUBLISH_NIBBLE:
            counter.messages_out += 1
        self._stream.write(data)

    def writelines(self, data: Iterable[bytes | bytearray | memoryview]) -> None:
        for chunk in data:
            self.write(chunk)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def counting_streams(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, counter: TrafficCounter
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """`reader` and `writer`, counting into `counter`; they stand in for the asyncio streams."""
    return (
        cast(asyncio.StreamReader, _CountingReader(reader, counter)),  # duck-typed stand-in
        cast(asyncio.StreamWriter, _CountingWriter(writer, counter)),  # duck-typed stand-in
    )
