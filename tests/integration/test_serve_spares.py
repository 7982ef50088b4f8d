"""``ember serve --spares 1``: a create takes the warmed spare, which was on record only while
it waited; after a ``kill -9`` of the daemon, the next one kills the spare the first left
(a child of the keeper, nobody's sandbox) and re-adopts only real sandboxes."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from ember.serve.spare_records import SPARE
from tests.integration.serve_daemon import Daemon, alive, free_port, wait_for

pytestmark = pytest.mark.kvm


def records(daemon: Daemon) -> dict[str, dict[str, object]]:
    found = {}
    for path in (daemon.state_dir / "sandboxes").glob("*.json"):
        try:
            found[path.stem] = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # being replaced right now
    return found


def spares_of(daemon: Daemon) -> dict[str, dict[str, object]]:
    return {k: r for k, r in records(daemon).items() if r["metadata"].get(SPARE) == "1"}  # type: ignore[union-attr]


def test_spares_are_handed_out_and_a_crashed_daemons_are_killed(tmp_path: Path) -> None:
    first = Daemon(tmp_path / "state", free_port(), ("--spares", "1"))
    first.start()
    second: Daemon | None = None
    try:
        wait_for(lambda: len(spares_of(first)) == 1, 120, "the first daemon's spare")
        [(spare_id, spare)] = spares_of(first).items()
        with first.client() as api:
            assert api.get("/sandboxes").json()["sandboxes"] == []  # a spare is nobody's
            made = api.post("/sandboxes", json={}).json()
            assert records(first)[made["id"]]["pid"] == spare["pid"]  # it became this one
            assert spare_id not in records(first)
            r = api.post(f"/sandboxes/{made['id']}/exec", json={"cmd": ["echo", "hi"]}).json()
            assert base64.b64decode(r["stdout"]) == b"hi\n"
        wait_for(lambda: len(spares_of(first)) == 1, 120, "the refill")
        [(refill_id, refill)] = spares_of(first).items()
        assert refill["pid"] != spare["pid"]

        first.kill9()
        assert alive(refill["pid"])  # the keeper's child outlived the daemon
        second = Daemon(first.state_dir, free_port())  # without --spares
        second.start()
        wait_for(lambda: not alive(refill["pid"]), 30, "the left spare to be killed")
        assert refill_id not in records(second)
        assert not Path(str(refill["dir"])).exists()
        with second.client() as api:
            listed = [s["id"] for s in api.get("/sandboxes").json()["sandboxes"]]
            assert listed == [made["id"]]  # re-adopted; the spare was not
            assert api.delete(f"/sandboxes/{made['id']}").status_code == 204
    finally:
        first.stop()
        if second is not None:
            second.stop()
