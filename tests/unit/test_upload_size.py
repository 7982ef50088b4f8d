"""An upload's announced length: the client says it when it knows it (``wire.source_size``),
and the agent gives the temporary file that length before its bytes (``files.Sink``), so that
a guest tmpfs mounted ``huge=within_size`` stores it in huge pages. The bytes sent decide."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from ember.agent.files import HPAGE_PMD_SIZE, Sink
from ember.client.wire import source_size


def test_a_known_length_sizes_the_temporary_file_before_its_bytes(tmp_path: Path) -> None:
    target = tmp_path / "big.bin"
    sink = Sink(str(target), None, False, 3 * HPAGE_PMD_SIZE)
    assert os.fstat(sink.fd).st_size == 3 * HPAGE_PMD_SIZE  # before any byte
    data = os.urandom(3 * HPAGE_PMD_SIZE)
    sink.write(data)
    sink.commit()
    assert target.read_bytes() == data


@pytest.mark.parametrize("sent", [0, 5, HPAGE_PMD_SIZE + 1, 4 * HPAGE_PMD_SIZE])
def test_the_bytes_sent_decide_the_length_whatever_was_announced(tmp_path: Path, sent: int) -> None:
    target = tmp_path / "f"
    sink = Sink(str(target), None, False, 2 * HPAGE_PMD_SIZE)
    data = b"x" * sent
    sink.write(data)
    sink.commit()
    assert target.stat().st_size == sent and target.read_bytes() == data


def test_small_appended_and_nonsense_lengths_size_nothing(tmp_path: Path) -> None:
    for size in (HPAGE_PMD_SIZE - 1, -5, None):  # small: no huge page to gain; bad: ignored
        sink = Sink(str(tmp_path / "a"), None, False, size)
        assert os.fstat(sink.fd).st_size == 0
        sink.abort()
    (tmp_path / "log").write_bytes(b"old")
    sink = Sink(str(tmp_path / "log"), None, True, 3 * HPAGE_PMD_SIZE)  # appends never
    sink.write(b"new")
    sink.commit()
    assert (tmp_path / "log").read_bytes() == b"oldnew"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log"]  # aborts left nothing


def test_an_aborted_sized_upload_leaves_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "keep"
    target.write_bytes(b"before")
    sink = Sink(str(target), None, False, 2 * HPAGE_PMD_SIZE)
    sink.write(b"half")
    sink.abort()
    assert target.read_bytes() == b"before"
    assert [p.name for p in tmp_path.iterdir()] == ["keep"]


def test_the_client_knows_the_length_of_bytes_and_of_regular_files(tmp_path: Path) -> None:
    assert source_size(b"abc") == 3
    assert source_size(bytearray(10)) == 10
    assert source_size(memoryview(bytes(12)).cast("I")) == 12  # bytes, not items
    path = tmp_path / "f"
    path.write_bytes(bytes(100))
    with path.open("rb") as f:
        assert source_size(f) == 100
        f.read(30)
        assert source_size(f) == 70  # what is left to read is what will be sent
    assert source_size(io.BytesIO(b"abc")) is None  # no descriptor: not known
    r, w = os.pipe()
    try:
        with os.fdopen(r, "rb") as pipe:
            assert source_size(pipe) is None  # a pipe has no length
    finally:
        os.close(w)
