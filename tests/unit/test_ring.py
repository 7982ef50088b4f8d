"""Memory channel rings (ember.ring) without KVM: both ends on one bytearray.

The reader is the host's, and the producer is the guest: an adversary. So besides
round trips through wrap-around, fragments and full rings, hypothesis drives a
hostile producer that writes any head, any record header and any bytes, in any
order, between reads: the reader may only return messages the rules allow or
raise RingError (and stay dead), and never hand out more than the ring held.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ember import ring

CAPACITY = 4096
MAX_MESSAGE = 3 * CAPACITY


def make_ring(capacity: int = CAPACITY) -> tuple[memoryview, memoryview, ring.RingReader]:
    slot = memoryview(bytearray(ring.PAGE + capacity))
    ctl, data = slot[: ring.PAGE].cast("Q"), slot[ring.PAGE :]
    reader = ring.RingReader(ctl, data, capacity, MAX_MESSAGE)
    reader.reset(lease=12345)
    return ctl, data, reader


def writer_for(
    ctl: memoryview,
    data: memoryview,
    reader: ring.RingReader,
    received: list[bytes],
    bell: memoryview | None = None,
) -> ring.RingWriter:
    """A producer whose 'wait for space' runs the consumer (one thread plays both)."""
    return ring.RingWriter(ctl, data, bell, lambda: received.extend(reader.read()))


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.lists(st.binary(max_size=3000), max_size=40), st.integers(1, 5000))
def test_messages_round_trip_in_order_through_wraps_and_fragments(
    messages: list[bytes], read_every: int
) -> None:
    ctl, data, reader = make_ring()
    received: list[bytes] = []
    writer = writer_for(ctl, data, reader, received)
    writer.max_record = 1000  # fragments, not only whole records
    sent = 0
    for message in messages:
        writer.send(memoryview(message))
        sent += len(message)
        if sent >= read_every:
            received.extend(reader.read())
            sent = 0
    received.extend(reader.read())
    assert received == messages
    assert reader.available() == 0 and not reader.mid_message


def test_a_message_larger_than_the_ring_goes_through_in_fragments() -> None:
    ctl, data, reader = make_ring()
    received: list[bytes] = []
    writer = writer_for(ctl, data, reader, received)
    big = bytes(range(256)) * 40  # 10 KiB through a 4 KiB ring
    writer.send(memoryview(big))
    received.extend(reader.read())
    assert received == [big]


def test_the_doorbell_rings_only_when_the_consumer_sleeps() -> None:
    ctl, data, reader = make_ring()
    bell = memoryview(bytearray(4)).cast("I")
    writer = writer_for(ctl, data, reader, [], bell)
    writer.send(memoryview(b"awake"))
    assert bell[0] == 0
    reader.sleep(True)
    writer.send(memoryview(b"asleep"))
    assert bell[0] == 1
    assert reader.read() == [b"awake", b"asleep"]


def test_a_producer_that_lost_its_lease_cannot_send() -> None:
    ctl, data, reader = make_ring()
    writer = writer_for(ctl, data, reader, [])
    writer.send(memoryview(b"mine"))
    ctl[ring.LEASE] = 0  # the host ended the channel
    with pytest.raises(BrokenPipeError):
        writer.send(memoryview(b"not any more"))


@pytest.mark.parametrize(
    ("head", "header", "why"),
    [
        (CAPACITY + 8, None, "not within"),  # more than a ring's worth
        (12, None, "not within"),  # not 8-aligned
        (16, (9, ring.RECORD_DATA), "passes the head"),  # 8 + 16 > 16
        (16, (0, 77), "unknown record kind"),
        (CAPACITY, (CAPACITY, ring.RECORD_DATA), "passes the ring's end"),
        (CAPACITY, (MAX_MESSAGE + 1, ring.RECORD_MORE), "passes the ring's end"),
    ],
)
def test_impossible_rings_are_refused(head: int, header: tuple[int, int] | None, why: str) -> None:
    ctl, data, reader = make_ring()
    if header is not None:
        data[:8] = struct.pack("<Q", header[0] | header[1] << 32)
    ctl[ring.HEAD] = head
    with pytest.raises(ring.RingError, match=why):
        reader.read()
    with pytest.raises(ring.RingError):  # and it stays dead
        reader.read()


def test_a_message_assembled_from_fragments_is_bounded() -> None:
    ctl, data, reader = make_ring()
    chunk = b"x" * 1000
    writer = writer_for(ctl, data, reader, [])
    with pytest.raises(ring.RingError, match="a message over"):
        for _ in range(MAX_MESSAGE // len(chunk) + 2):
            writer._put(memoryview(chunk), ring.RECORD_MORE)
            reader.read()


# --- a hostile producer ---------------------------------------------------------------

_ops = st.one_of(
    st.tuples(st.just("head"), st.integers(0, 2**64 - 1)),
    st.tuples(st.just("head+"), st.integers(0, CAPACITY + 64)),
    st.tuples(
        st.just("header"),
        st.integers(0, CAPACITY // 8 - 1),
        st.integers(0, 2**32 - 1) | st.integers(0, 256),
        st.integers(0, 2**32 - 1) | st.sampled_from([1, 2, 3]),
    ),
    st.tuples(st.just("bytes"), st.integers(0, CAPACITY - 1), st.binary(max_size=64)),
    st.tuples(st.just("tail"), st.integers(0, 2**64 - 1)),  # the guest scribbles on tail too
    st.tuples(st.just("read"), st.integers(1, 2 * CAPACITY)),
)


def scribble(op: tuple, ctl: memoryview, data: memoryview) -> bool:  # type: ignore[type-arg]
    """Apply one of the hostile producer's writes; False for a "read" (the test's turn)."""
    kind = op[0]
    if kind == "head":
        ctl[ring.HEAD] = op[1]
    elif kind == "head+":
        ctl[ring.HEAD] = (ctl[ring.HEAD] + op[1]) % 2**64
    elif kind == "header":
        data[op[1] * 8 : op[1] * 8 + 8] = struct.pack("<Q", op[2] | (op[3] << 32) % 2**64)
    elif kind == "bytes":
        end = min(CAPACITY, op[1] + len(op[2]))
        data[op[1] : end] = op[2][: end - op[1]]
    elif kind == "tail":
        ctl[ring.TAIL] = op[1]
    else:
        return False
    return True


@settings(
    max_examples=400,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(st.lists(_ops, max_size=60))
def test_a_hostile_producer_cannot_make_the_reader_misbehave(ops: list[tuple]) -> None:  # type: ignore[type-arg]
    ctl, data, reader = make_ring()
    consumed_before = 0
    dead = False
    for op in ops:
        if scribble(op, ctl, data):
            continue
        try:
            messages = reader.read(op[1])
        except ring.RingError:
            dead = True
            with pytest.raises(ring.RingError):
                reader.read()
            continue
        assert not dead, "a dead ring came back"
        consumed = reader._tail - consumed_before
        consumed_before = reader._tail
        assert 0 <= consumed <= CAPACITY  # never more than one ring's worth per read
        payload = sum(len(m) for m in messages)
        assert payload <= MAX_MESSAGE * max(1, len(messages))
        assert all(len(m) <= MAX_MESSAGE for m in messages)
        if consumed:  # the reader publishes its own tail, never reads the guest's back
            assert ctl[ring.TAIL] == reader._tail


# --- byte streams (file transfers): fill in place, take in place ----------------------


@settings(max_examples=100, deadline=None, derandomize=True)
@given(st.binary(max_size=20_000), st.integers(1, 3000))
def test_a_byte_stream_filled_and_taken_in_place_arrives_whole(blob: bytes, piece: int) -> None:
    ctl, data, reader = make_ring()
    taken = bytearray()

    def use(view: memoryview) -> bool:
        taken.extend(view)
        return True

    writer = ring.RingWriter(ctl, data, None, lambda: reader.take(use))
    source = memoryview(blob)

    def readinto(view: memoryview) -> int:  # what a file's readinto does
        nonlocal source
        n = min(len(view), piece, source.nbytes)
        view[:n] = source[:n]
        source = source[n:]
        return n

    while writer.fill(readinto, writer.max_record):
        pass
    reader.take(use)
    assert bytes(taken) == blob and reader.available() == 0


def test_take_stops_after_the_record_its_user_refuses() -> None:
    ctl, data, reader = make_ring()
    writer = writer_for(ctl, data, reader, [])
    for message in (b"one", b"", b"after"):
        writer.send(memoryview(message))
    seen: list[bytes] = []

    def use(view: memoryview) -> bool:
        seen.append(bytes(view))
        return bool(view.nbytes)  # an empty record ends a file transfer

    reader.take(use)
    assert seen == [b"one", b""] and reader.available() == 16  # "after" is left


def test_fill_refuses_a_readinto_that_claims_more_than_it_was_given() -> None:
    ctl, data, reader = make_ring()
    writer = writer_for(ctl, data, reader, [])
    with pytest.raises(ValueError, match="at most 100"):
        writer.fill(lambda view: len(view) + 1, 100)
    assert ctl[ring.HEAD] == 0  # nothing was published


@settings(max_examples=300, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
@given(st.lists(_ops, max_size=60))
def test_a_hostile_producer_cannot_make_take_misbehave(ops: list[tuple]) -> None:  # type: ignore[type-arg]
    """take() hands out views of the ring only, never past it or the head, and dies for good."""
    ctl, data, reader = make_ring()
    dead = False
    for op in ops:
        if scribble(op, ctl, data):
            continue
        views: list[int] = []
        before = reader._tail
        try:
            consumed = reader.take(lambda view, seen=views: seen.append(view.nbytes) is None)
        except ring.RingError:
            dead = True
            with pytest.raises(ring.RingError):
                reader.take(lambda view: True)
            continue
        assert not dead, "a dead ring came back"
        assert consumed == reader._tail - before and 0 <= consumed <= CAPACITY
        assert all(0 <= n <= CAPACITY - 8 for n in views) and sum(views) <= consumed
