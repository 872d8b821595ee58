"""The connection's FrameReader over an in-memory StreamReader: buffering, limits, keep-alive, fairness."""

from __future__ import annotations

import asyncio
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.broker import frames
from gateway.broker.frames import FrameReader, IdleTimeout
from gateway.core import wire
from gateway.errors import ProtocolViolation

PINGREQ = wire.encode_frame(wire.PINGREQ, 0, b"")


def publish(n: int) -> bytes:
    return wire.encode_frame(wire.PUBLISH, 0, b"\x00\x01t" + str(n).encode())


def stream_of(*chunks: bytes, eof: bool = True) -> asyncio.StreamReader:
    stream = asyncio.StreamReader()
    for chunk in chunks:
        stream.feed_data(chunk)
    if eof:
        stream.feed_eof()
    return stream


async def drain(reader: FrameReader) -> list[frames.Frame]:
    found = []
    while (frame := await reader.next()) is not None:
        found.append(frame)
    return found


async def test_every_packet_of_one_chunk_is_handed_on_in_order() -> None:
    """Many packets arriving in one chunk come out one by one, in order, then None at EOF."""
    reader = FrameReader(stream_of(b"".join(publish(n) for n in range(500)) + PINGREQ), 1024)
    found = await drain(reader)
    assert len(found) == 501
    assert found[:2] == [(wire.PUBLISH, 0, b"\x00\x01t0"), (wire.PUBLISH, 0, b"\x00\x01t1")]
    assert found[-1] == (wire.PINGREQ, 0, b"")


async def test_a_packet_split_across_chunks_is_put_together() -> None:
    """A packet whose header and body arrive byte by byte, across reads, is handed on whole."""
    stream = stream_of(eof=False)
    reader = FrameReader(stream, 1024)
    packet = wire.encode_frame(wire.PUBLISH, 2, b"\x00\x01t\x00\x07" + b"x" * 300)  # 2-byte length

    async def trickle() -> None:
        for byte in packet + PINGREQ:
            stream.feed_data(bytes([byte]))
            await asyncio.sleep(0)
        stream.feed_eof()

    feeder = asyncio.create_task(trickle())
    assert await drain(reader) == [
        (wire.PUBLISH, 2, b"\x00\x01t\x00\x07" + b"x" * 300),
        (wire.PINGREQ, 0, b""),
    ]
    await feeder


async def test_a_packet_larger_than_a_chunk_arrives_intact() -> None:
    """A body of several chunks (up to the size limit) is read whole, and the next packet after it."""
    body = bytes(range(256)) * (3 * frames.CHUNK_BYTES // 256)
    reader = FrameReader(stream_of(wire.encode_frame(wire.PUBLISH, 0, body) + PINGREQ), len(body))
    assert await drain(reader) == [(wire.PUBLISH, 0, body), (wire.PINGREQ, 0, b"")]


async def test_an_oversize_packet_is_refused_before_its_body_arrives() -> None:
    """The size limit applies as soon as the header is complete: the body is never waited for."""
    header = wire.encode_frame(wire.PUBLISH, 0, b"x" * 2000)[:3]
    reader = FrameReader(stream_of(header, eof=False), 1024)
    with pytest.raises(ProtocolViolation, match="exceeds the 1024-byte limit"):
        await asyncio.wait_for(reader.next(), 1)


async def test_a_remaining_length_over_four_bytes_is_refused() -> None:
    """Five length bytes are a violation, not a wait for more."""
    reader = FrameReader(stream_of(b"\x30\xff\xff\xff\xff\x01", eof=False), 1024)
    with pytest.raises(ProtocolViolation, match="longer than 4 bytes"):
        await asyncio.wait_for(reader.next(), 1)


async def test_eof_inside_a_packet_is_an_incomplete_read() -> None:
    """A connection that ends halfway through a packet raises IncompleteReadError, not None."""
    reader = FrameReader(stream_of(PINGREQ + publish(1)[:-2]), 1024)
    assert await reader.next() == (wire.PINGREQ, 0, b"")
    with pytest.raises(asyncio.IncompleteReadError):
        await reader.next()


async def test_bytes_after_connect_in_the_same_chunk_are_kept_for_the_session() -> None:
    """CONNECT and the packets sent right behind it in one TCP segment all come out of the same reader."""
    connect = wire.encode_frame(wire.CONNECT, 0, b"\x00\x04MQTT\x04\x02\x00\x3c\x00\x01d")
    reader = FrameReader(stream_of(connect + publish(7) + PINGREQ), 1024)
    first = await asyncio.wait_for(reader.next(), 1)  # as the engine reads CONNECT
    assert first is not None and first[0] == wire.CONNECT
    reader.set_idle_limit(10)  # then the session's loop takes over the same reader
    assert await drain(reader) == [(wire.PUBLISH, 0, b"\x00\x01t7"), (wire.PINGREQ, 0, b"")]
    reader.close()


@given(st.lists(st.binary(max_size=300), max_size=20), st.lists(st.integers(1, 400), max_size=30))
def test_packets_come_out_whole_however_the_bytes_are_cut(bodies: list[bytes], cuts: list[int]) -> None:
    """Property: any packets, delivered in chunks of any sizes, come out exactly as encoded."""
    data = b"".join(wire.encode_frame(wire.PUBLISH, 0, body) for body in bodies)
    chunks, pos = [], 0
    for size in cuts:
        chunks.append(data[pos : pos + size])
        pos += size
    chunks.append(data[pos:])

    async def run() -> list[frames.Frame]:
        return await drain(FrameReader(stream_of(*chunks), 1024))

    assert asyncio.run(run()) == [(wire.PUBLISH, 0, body) for body in bodies]


@given(st.binary(max_size=64))
def test_any_bytes_give_packets_or_a_framing_error(data: bytes) -> None:
    """Property: arbitrary bytes give packets then None, a ProtocolViolation or an IncompleteReadError."""

    async def run() -> None:
        reader = FrameReader(stream_of(data), 16)
        try:
            await drain(reader)
        except (ProtocolViolation, asyncio.IncompleteReadError):
            pass

    asyncio.run(run())


# --- keep-alive ------------------------------------------------------------------------------


async def test_waiting_past_the_idle_limit_raises_idle_timeout() -> None:
    """A reader that waits longer than its idle limit for a packet raises IdleTimeout at about that time."""
    reader = FrameReader(stream_of(eof=False), 1024)
    reader.set_idle_limit(0.3)
    started = time.monotonic()
    with pytest.raises(IdleTimeout):
        await asyncio.wait_for(reader.next(), 3)
    assert 0.25 <= time.monotonic() - started <= 1.0
    reader.close()


async def test_packets_in_time_keep_the_reader_going() -> None:
    """A packet every 0.1 s against a 0.3 s limit never times out, for several limits' worth."""
    stream = stream_of(eof=False)
    reader = FrameReader(stream, 1024)
    reader.set_idle_limit(0.3)

    async def ping() -> None:
        for _ in range(12):
            await asyncio.sleep(0.1)
            stream.feed_data(PINGREQ)
        stream.feed_eof()

    feeder = asyncio.create_task(ping())
    assert len(await drain(reader)) == 12
    await feeder
    reader.close()


async def test_the_clock_does_not_run_while_the_caller_holds_off_reading() -> None:
    """Back-pressure: time spent not reading (between packets) does not count, and after a hold of
    several limits the reader still waits a full limit for the next packet."""
    stream = stream_of(PINGREQ, eof=False)
    reader = FrameReader(stream, 1024)
    reader.set_idle_limit(0.3)
    assert await reader.next() == (wire.PINGREQ, 0, b"")
    await asyncio.sleep(1.0)  # the caller is held (a full ingest queue): no read
    asyncio.get_running_loop().call_later(0.2, stream.feed_data, PINGREQ)
    assert await asyncio.wait_for(reader.next(), 2) == (wire.PINGREQ, 0, b"")
    with pytest.raises(IdleTimeout):  # and the limit still holds afterwards
        await asyncio.wait_for(reader.next(), 2)
    reader.close()


async def test_a_packet_trickling_in_counts_from_when_the_wait_for_it_began() -> None:
    """Bytes of an unfinished packet do not restart the clock: a slow drip still times out."""
    stream = stream_of(eof=False)
    reader = FrameReader(stream, 1024)
    reader.set_idle_limit(0.3)
    packet = publish(1)

    async def drip() -> None:
        for byte in packet:
            stream.feed_data(bytes([byte]))
            await asyncio.sleep(0.1)

    feeder = asyncio.create_task(drip())
    started = time.monotonic()
    with pytest.raises(IdleTimeout):
        await asyncio.wait_for(reader.next(), 3)
    assert time.monotonic() - started <= 0.6
    feeder.cancel()
    reader.close()


async def test_cancelling_the_reader_is_a_cancellation_not_a_timeout() -> None:
    """stop() cancels the reader task: it sees CancelledError, never IdleTimeout."""
    reader = FrameReader(stream_of(eof=False), 1024)
    reader.set_idle_limit(5)
    task = asyncio.create_task(reader.next())
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    reader.close()


# --- fairness -----------------------------------------------------------------------------------


async def test_a_full_buffer_is_consumed_with_regular_yields_to_the_loop() -> None:
    """Taking packets from a full buffer lets other tasks run every YIELD_EVERY packets."""
    count = 20 * frames.YIELD_EVERY
    reader = FrameReader(stream_of(PINGREQ * count), 1024)
    turns = 0
    done = False

    async def other_connection() -> None:
        nonlocal turns
        while not done:
            turns += 1
            await asyncio.sleep(0)

    other = asyncio.create_task(other_connection())
    await asyncio.sleep(0)
    taken = 0
    while await reader.next() is not None:
        taken += 1
    done = True
    await other
    assert taken == count
    assert turns >= count // frames.YIELD_EVERY - 1


def test_a_frame_header_is_found_at_an_offset() -> None:
    """frame_header reads the packet at `pos`: first byte, body start and end, with 1-4 length bytes."""
    small = PINGREQ + publish(1)
    assert wire.frame_header(small, 2, 1024) == (0x30, 4, 4 + len(publish(1)) - 2)
    big = b"xx" + wire.encode_frame(wire.PUBLISH, 0, b"y" * 200)
    assert wire.frame_header(big, 2, 1024) == (0x30, 5, 205)
    assert wire.frame_header(big[:4], 2, 1024) is None  # length byte still to come
    assert wire.frame_header(b"", 0, 1024) is None
