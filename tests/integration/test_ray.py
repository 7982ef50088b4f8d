"""Ember on Ray: a two-node ``ray.cluster_utils.Cluster`` on this machine, a node agent and
an ``ember serve`` on each, sandboxes placed across them through ``ember.ray``.

The head node and one worker node each advertise an ``ember_kvm`` resource and get a
state directory and a template store of their own under the test's tmp dir (each store
has nothing but the default template: the head's linked from the host's cache, the
worker's copied from the head by ``start_nodes``; a template made on one node is missing
on the other until it is copied).  The registry lives on the head; the node-loss test,
last, removes the worker.  Teardown stops the agents (which destroys their sandboxes),
shuts Ray down and then checks that no daemon, supervisor, keeper or VMM of these state
directories is left.  Every wait is bounded and generous (the host is shared); nothing
asserts on wall-clock time.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import ray
from ray.cluster_utils import Cluster

import ember.ray
from ember import SandboxError, SandboxLost
from ember.ray.node import agent, pushed
from ember.ray.registry import ray_nodes, registry
from ember.ray.transfer import INCOMING
from ember.snapshot.memory_file import memory_digest
from ember.templates import find
from tests.integration.conftest import Images
from tests.integration.serve_daemon import alive, wait_for

pytestmark = pytest.mark.kvm

NODE_ARGS: dict[str, Any] = {
    "num_cpus": 1,
    "resources": {"ember_kvm": 1},
    "object_store_memory": 80 << 20,
}
# Ray notices a dead node after health_check_failure_threshold missed checks: seconds, not 30
FAST_HEALTH = {
    "health_check_period_ms": 1000,
    "health_check_timeout_ms": 1000,
    "health_check_failure_threshold": 3,
}
MAX_PER_NODE = 2
WAIT = 120.0  # the longest any one thing may take on a busy host


@dataclass
class Ctx:
    cluster: Cluster
    worker: Any  # the worker node's ray._private.node.Node
    head_id: str
    worker_id: str
    tmp: Path


def _ours(tmp: Path) -> list[int]:
    """Processes whose command line names the test's tmp dir (supervisors, daemons,
    keepers)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if str(tmp).encode() in cmdline and alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def _vmm_pids(state: Path) -> list[int]:
    """The VMMs recorded under ``state`` (a node's state dir, or the tmp dir: all nodes)."""
    pids = []
    for record in state.glob("**/sandboxes/*.json"):
        try:
            pids.append(int(json.loads(record.read_text())["pid"]))
        except (OSError, ValueError, KeyError):
            continue
    return pids


@pytest.fixture(scope="module")
def ctx(images: Images, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ctx]:
    default = find()  # the default template, built here once rather than by two daemons at once
    tmp = tmp_path_factory.mktemp("ray")
    cluster = Cluster(
        initialize_head=True, head_node_args={**NODE_ARGS, "_system_config": FAST_HEALTH}
    )
    vmms: list[int] = []
    try:
        worker = cluster.add_node(**NODE_ARGS)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, namespace="ember-tests")
        head_id = ray.get_runtime_context().get_node_id()
        for n in ray_nodes():  # each node's store: the head's has the default template (the
            store = tmp / "templates" / str(n["NodeID"])[:16]  # worker's is copied from it)
            store.mkdir(parents=True)
            if n["NodeID"] == head_id:
                (store / default.dir.name).symlink_to(default.dir)
        infos = ember.ray.start_nodes(state_dir=str(tmp / "nodes"), max_sandboxes=MAX_PER_NODE,
                                      templates_dir=str(tmp / "templates"))  # fmt: skip
        assert len(infos) == 2, infos
        (worker_id,) = [i.node_id for i in infos if i.node_id != head_id]
        yield Ctx(cluster, worker, head_id, worker_id, tmp)
        vmms = _vmm_pids(tmp)
        ember.ray.stop_nodes()
    finally:
        ray.shutdown()
        cluster.shutdown()
    wait_for(lambda: not _ours(tmp), WAIT, "the daemons, supervisors and keepers to exit")
    wait_for(lambda: not any(alive(p) for p in vmms), WAIT, "the VMMs to exit")
    assert not list(tmp.glob("nodes/*/sandboxes/*.json"))


def _by_node(ctx: Ctx) -> dict[str, int]:
    return {c.node.node_id: c.sandboxes for c in ember.ray.nodes()}


def _settled() -> None:
    """Until the capacities the agents pushed (placement's view) match the nodes' own now:
    a test that expects a given node must not place on a view a second old."""

    def same() -> bool:
        fresh = {c.node.node_id: c.load for c in ember.ray.nodes()}
        return {c.node.node_id: c.load for c in pushed()} == fresh

    wait_for(same, WAIT, "the pushed capacities to catch up")


def test_sandboxes_on_both_nodes(ctx: Ctx) -> None:
    caps = ember.ray.nodes()
    assert {c.node.node_id for c in caps} == {ctx.head_id, ctx.worker_id}
    assert all(c.mem_available_mib > 0 and c.node.cpus >= 1 for c in caps)
    made = [ember.ray.Sandbox(metadata={"suite": "both", "n": str(i)}) for i in range(2)]
    try:
        assert {sb.node.node_id for sb in made} == {ctx.head_id, ctx.worker_id}  # spread
        for i, sb in enumerate(made):
            r = sb.exec(["sh", "-c", f"echo sandbox-{i}; echo err >&2"])
            assert (r.exit_code, r.stdout, r.stderr) == (0, f"sandbox-{i}\n".encode(), b"err\n")
            assert sb.run_code("6*7").value == "42"
            sb.files.write("/tmp/x", b"on a node")
            assert sb.files.read("/tmp/x") == b"on a node"
            stream = sb.exec_stream(["sh", "-c", "echo a; echo b >&2; exit 3"])
            chunks = []
            while True:
                try:
                    chunks.append(next(stream))
                except StopIteration as stop:
                    assert stop.value.exit_code == 3
                    break
            assert sorted((c.stream, c.data) for c in chunks) == [("stderr", b"b\n"),
                                                                  ("stdout", b"a\n")]  # fmt: skip
        listed = ember.ray.list(metadata={"suite": "both"})
        assert {(s["id"], s["node"]) for s in listed} == {(sb.id, sb.node.node_id) for sb in made}
        assert ember.ray.list(metadata={"suite": "none"}) == []
        assert _by_node(ctx) == {ctx.head_id: 1, ctx.worker_id: 1}
        done = subprocess.run(
            [sys.executable, "-m", "ember.ray", "status", "--json", "--address",
             ctx.cluster.address], capture_output=True, text=True, timeout=WAIT, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        shown = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
        assert {(n["node"], n["sandboxes"]) for n in shown} == {(ctx.head_id, 1),
                                                               (ctx.worker_id, 1)}  # fmt: skip
    finally:
        for sb in made:
            sb.close()
    assert ember.ray.list(metadata={"suite": "both"}) == []
    assert ray.get(registry().find.remote({"suite": "both"})) == []


def test_async_sandbox(ctx: Ctx) -> None:
    async def main() -> tuple[str, str, bytes, list[tuple[str, bytes]], Any]:
        async with ember.ray.AsyncSandbox(metadata={"suite": "async"}) as sb:
            assert sb.id is not None
            r = await sb.exec(["sh", "-c", "echo async"])
            chunks = [(c.stream, c.data) async for c in sb.exec_stream(["sh", "-c", "echo s"])]
            other = await ember.ray.connect_async(sb.id)
            value = (await other.run_code("6*7")).value
            await other.detach()
            return sb.id, sb.node.node_id, r.stdout, chunks, value

    sandbox_id, node_id, out, chunks, value = asyncio.run(main())
    assert node_id in (ctx.head_id, ctx.worker_id)
    assert (out, chunks, value) == (b"async\n", [("stdout", b"s\n")], "42")
    assert ember.ray.list(metadata={"suite": "async"}) == []
    assert ray.get(registry().lookup.remote(sandbox_id)) is None


def test_connect_from_another_driver(ctx: Ctx) -> None:
    sb = ember.ray.Sandbox(metadata={"suite": "reconnect"})
    try:
        sb.files.write("/tmp/note", b"left by the first driver")
        script = textwrap.dedent(f"""
            import ray, ember.ray
            ray.init(address={ctx.cluster.address!r}, namespace="another-driver")
            sb = ember.ray.connect({sb.id!r})
            print(sb.node.node_id)
            print(sb.files.read("/tmp/note").decode())
            print(sb.exec(["sh", "-c", "echo from-driver-2"]).stdout.decode().strip())
            print(",".join(s["id"] for s in ember.ray.list(metadata={{"suite": "reconnect"}})))
            sb.detach()  # leaves it running for the first driver
            mine = ember.ray.Sandbox(metadata={{"suite": "left"}}, timeout=600)
            mine.files.write("/tmp/note", b"left by the second driver")
            print(mine.id)  # and this driver exits without closing it
        """)
        done = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=WAIT,
            check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        *lines, left_id = done.stdout.strip().splitlines()[-5:]
        assert lines == [sb.node.node_id, "left by the first driver", "from-driver-2", sb.id]
        left = ember.ray.connect(left_id)  # the second driver is gone, its sandbox is not
        assert left.files.read("/tmp/note") == b"left by the second driver"
        assert left.info()["expires_at"] is not None
        assert [s["id"] for s in ember.ray.list(metadata={"suite": "left"})] == [left_id]
        left.close()
        assert sb.exec("echo still-here").stdout == b"still-here\n"
        other = ember.ray.connect(sb.id)  # and in this driver, a second handle
        assert other.node == sb.node
        other.detach()
    finally:
        ember.ray.kill(sb.id)  # type: ignore[arg-type]
    with pytest.raises(SandboxError):
        ember.ray.connect(sb.id)  # type: ignore[arg-type]


def test_placement_honours_capacity(ctx: Ctx) -> None:
    made: list[ember.ray.Sandbox] = []
    try:
        for _ in range(2 * MAX_PER_NODE):
            made.append(ember.ray.Sandbox(placement="pack", metadata={"suite": "pack"}))
        first = [sb.node.node_id for sb in made]
        # pack fills one node to its limit before it uses the other
        assert first[:MAX_PER_NODE] == [first[0]] * MAX_PER_NODE
        assert first[MAX_PER_NODE:] == [n for n in (ctx.head_id, ctx.worker_id)
                                        if n != first[0]] * MAX_PER_NODE  # fmt: skip
        with pytest.raises(SandboxError, match="no node has room"):
            ember.ray.Sandbox()
        caps = ember.ray.nodes()
        assert all(c.sandboxes == MAX_PER_NODE and c.reserved == 0 for c in caps)
        assert all(not c.fits(512) for c in caps)
    finally:
        for sb in made:
            sb.close()
    assert _by_node(ctx) == {ctx.head_id: 0, ctx.worker_id: 0}


def _ember(ctx: Ctx, *argv: str) -> subprocess.CompletedProcess[str]:
    """The ``ember`` command line, as a user runs it against this cluster."""
    return subprocess.run(
        [sys.executable, "-m", "ember.cli.main", "cluster", argv[0], "--address",
         ctx.cluster.address, *argv[1:]], capture_output=True, text=True, timeout=WAIT,
        check=False,
    )  # fmt: skip


def test_cluster_status_and_run(ctx: Ctx, tmp_path: Path) -> None:
    default = find().dir.name
    shown = _ember(ctx, "status", "--json")
    assert shown.returncode == 0, shown.stderr[-3000:]
    nodes = [json.loads(line) for line in shown.stdout.splitlines() if line.startswith("{")]
    assert {n["node"] for n in nodes} == {ctx.head_id, ctx.worker_id}
    assert all(n["templates"] == [default] and n["max_sandboxes"] == MAX_PER_NODE for n in nodes)
    copied = _store(ctx, ctx.worker_id) / default  # start_nodes copied it, verified
    assert copied.is_dir() and not copied.is_symlink()
    assert memory_digest(copied / "memory") == memory_digest(find().dir / "memory")
    table = _ember(ctx, "status")
    assert table.returncode == 0 and "TEMPLATES" in table.stdout, table.stderr[-3000:]
    assert f"{ctx.head_id[:12]}" in table.stdout and "2 nodes answering" in table.stdout

    script = tmp_path / "job.py"
    script.write_text(
        "import sys\nprint('args', sys.argv[1:])\nprint('to stderr', file=sys.stderr)\n"
        "sys.exit(int(sys.argv[1]))\n"
    )
    _settled()
    full = [ember.ray.Sandbox(placement="pack", metadata={"suite": "run"})
            for _ in range(MAX_PER_NODE)]  # fmt: skip
    try:  # one node is full: the script runs on the other
        assert len({sb.node.node_id for sb in full}) == 1
        done = _ember(ctx, "run", str(script), "3", "--flag")
        assert done.returncode == 3, done.stderr[-3000:]
        assert done.stdout == "args ['3', '--flag']\n"
        assert "to stderr" in done.stderr
        assert _ember(ctx, "run", str(script), "0").returncode == 0
    finally:
        for sb in full:
            sb.close()
    assert ember.ray.list(metadata={"ember": "cluster run"}) == []  # each run's sandbox is gone
    missing = _ember(ctx, "run", str(tmp_path / "nope.py"))
    assert missing.returncode == 2 and "cannot read" in missing.stderr


def _store(ctx: Ctx, node_id: str) -> Path:
    return ctx.tmp / "templates" / node_id[:16]


def test_template_copied_to_the_node_lacking_it(ctx: Ctx) -> None:
    _settled()
    source = ember.ray.Sandbox(metadata={"suite": "dist"})
    a, made = source.node, [source]
    b_id = ctx.worker_id if a.node_id == ctx.head_id else ctx.head_id
    b = agent(next(c.node for c in ember.ray.nodes() if c.node.node_id == b_id))
    try:
        source.files.write("/tmp/marker", b"made on the first node")
        source.snapshot("dist")
        assert (_store(ctx, a.node_id) / "dist" / "state").is_file()
        assert not (_store(ctx, b_id) / "dist").exists()

        def a_has_it() -> bool:  # the agents push capacity (and templates) every second
            return any(c.node == a and "dist" in c.templates for c in pushed())

        wait_for(a_has_it, WAIT, "the source node to report the new template")

        # a peer that sends one flipped bit: the copy is refused and nothing of it stays
        @ray.remote(num_cpus=0)
        class Liar:
            def __init__(self, honest: Any) -> None:
                self.honest = honest

            def template_manifest(self, name: str) -> Any:
                import ray

                return ray.get(self.honest.template_manifest.remote(name))

            def read_template(self, name: str, file: str, offset: int, length: int) -> bytes:
                import ray

                data: bytes = ray.get(self.honest.read_template.remote(name, file, offset, length))
                if file == "memory" and offset == 0:
                    data = bytes([data[0] ^ 0x10]) + data[1:]
                return data

        liar = Liar.remote(agent(a))  # type: ignore[attr-defined]
        with pytest.raises(ray.exceptions.RayTaskError, match="discarded"):
            ray.get(b.pull_template.remote("dist", liar), timeout=WAIT * 5)
        assert not (_store(ctx, b_id) / "dist").exists()
        assert list((_store(ctx, b_id) / INCOMING).iterdir()) == []
        assert "dist" not in ray.get(b.templates.remote())

        # placement prefers the node that has it (spread alone would pick the empty one)...
        second = ember.ray.Sandbox(template="dist", metadata={"suite": "dist"})
        made.append(second)
        assert second.node == a
        assert second.files.read("/tmp/marker") == b"made on the first node"
        # ...and when that node is full, the other one gets a verified copy and restores it
        third = ember.ray.Sandbox(template="dist", metadata={"suite": "dist"})
        made.append(third)
        assert third.node.node_id == b_id
        assert third.files.read("/tmp/marker") == b"made on the first node"
        assert ray.get(b.templates.remote()) == sorted([find().dir.name, "dist"])
        digests = {
            ray.get(agent(n).template_manifest.remote("dist")).digest for n in (a, third.node)
        }
        assert len(digests) == 1
        assert list((_store(ctx, b_id) / INCOMING).iterdir()) == []
    finally:
        for sb in made:
            sb.close()


def test_node_loss_raises_sandbox_lost(ctx: Ctx) -> None:
    _settled()
    here = ember.ray.Sandbox(metadata={"suite": "loss"})
    there = ember.ray.Sandbox(metadata={"suite": "loss"})
    if there.node.node_id != ctx.worker_id:
        here, there = there, here
    assert (here.node.node_id, there.node.node_id) == (ctx.head_id, ctx.worker_id)
    lost_id = there.id
    worker_state = Path(ctx.tmp / "nodes" / ctx.worker_id[:16])
    vmms = _vmm_pids(worker_state)
    assert vmms
    in_flight: list[BaseException] = []

    def long_call() -> None:  # a call under way when the node goes must end too
        try:
            there.exec(["sleep", "600"], timeout=700)
        except BaseException as exc:
            in_flight.append(exc)

    caller = threading.Thread(target=long_call, daemon=True)
    try:
        caller.start()
        time.sleep(1.0)  # (not a timing assertion: the call is under way, or it fails anyway)
        removed = time.monotonic()
        ctx.cluster.remove_node(ctx.worker)

        def lost() -> bool:  # the daemon may take a moment to be stopped: then it refuses
            try:
                there.exec("true", timeout=30)
            except SandboxLost:
                return True
            return False

        wait_for(lost, WAIT, "a call on the lost node to raise SandboxLost")
        print(f"SandboxLost {time.monotonic() - removed:.1f} s after remove_node")
        caller.join(WAIT)
        assert not caller.is_alive(), "a call in flight on the lost node hangs"
        assert len(in_flight) == 1 and isinstance(in_flight[0], SandboxLost), in_flight
        with pytest.raises(SandboxLost):  # and every call after it, at once
            there.files.read("/etc/hostname")
        with pytest.raises(SandboxLost):
            list(there.exec_stream("echo x"))

        def forgotten() -> bool:
            return ray.get(registry().lookup.remote(lost_id)) is None

        wait_for(forgotten, WAIT, "the registry to forget the lost node's sandbox")
        print(f"forgotten {time.monotonic() - removed:.1f} s after remove_node")
        assert [n.node_id for n in ray.get(registry().nodes.remote())] == [ctx.head_id]
        assert {s["id"] for s in ember.ray.list(metadata={"suite": "loss"})} == {here.id}
        # new sandboxes go to the node that is left, the survivor still works
        with ember.ray.Sandbox(metadata={"suite": "loss"}) as new:
            assert new.node.node_id == ctx.head_id
            assert new.exec("echo new").stdout == b"new\n"
        assert here.exec("echo here").stdout == b"here\n"
        there.close()  # a lost sandbox's close is a no-op, not an error
        # the worker's supervisor destroyed what the cluster forgot
        wait_for(lambda: not list(worker_state.glob("sandboxes/*.json")), WAIT,
                 "the lost node's sandboxes to be destroyed")  # fmt: skip
        wait_for(lambda: not any(alive(p) for p in vmms), WAIT,
                 "the lost node's VMMs to exit")  # fmt: skip
    finally:
        here.close()
