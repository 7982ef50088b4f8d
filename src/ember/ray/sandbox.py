"""``ember.ray.Sandbox``: the SDK's sandbox, placed on a cluster node and reached directly.

The class is :class:`~ember.sandbox.remote.RemoteSandbox` (the client of one
``ember serve``) with three differences, so the HTTP client, the error decoding and
every method are the daemon client's own, not a copy:

* **where**: the constructor reads the capacities the node agents pushed to the registry,
  reserves a slot on the best node (``placement="spread"`` or ``"pack"``, nodes that have
  the template first, :mod:`.placement`), has that node's agent copy the template from a
  peer if it lacks it, and creates the sandbox through that node's HTTP API; the
  registry records id -> node.
* **how**: the node's :class:`NodeApi` turns on TCP keepalive, so a machine that
  vanishes mid-call (no RST, no FIN) fails the call within :data:`KEEPALIVE_S`.
* **failures**: a node that cannot be reached (connection refused, reset, timed out)
  or whose agent is dead raises :class:`~ember.errors.SandboxLost`, and the registry is
  told, so it forgets the node's sandboxes and placement skips it.

Data goes straight from the driver to the node: one hop, streamed (``exec_stream``
is chunked NDJSON as it happens), never through Ray's object store.
"""

from __future__ import annotations

import builtins
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import httpx
import ray

from ember.client import OutputChunk
from ember.errors import ConfigError, SandboxError, SandboxLost
from ember.ray import node as nodes_
from ember.ray.placement import Capacity, NodeInfo, Strategy, rank
from ember.ray.registry import Placed, registry
from ember.sandbox import daemon
from ember.sandbox.options import SandboxOptions
from ember.sandbox.remote import Api, RemoteSandbox
from ember.sandbox.signature import takes
from ember.sandbox.wire import ServerError

T = TypeVar("T")
TRANSFER_TIMEOUT_S = 900.0  # a template copied between nodes (~120 MiB of data here)
KEEPALIVE_S = (5, 2, 3)  # idle, interval, probes: a silent peer is dead after ~11 s


def _keepalive() -> builtins.list[tuple[int, int, int]]:
    idle, interval, count = KEEPALIVE_S
    return [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
            (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle),
            (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval),
            (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, count)]  # fmt: skip


class NodeApi(Api):
    """The daemon client of one node: its token from the agent, keepalive on, and an
    unreachable node reported as lost."""

    def __init__(self, node: NodeInfo) -> None:
        make = partial(httpx.Client, transport=httpx.HTTPTransport(socket_options=_keepalive()))
        self.url, self.http = daemon.http_client(make, node.url, node.token)
        self.node = node

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            return super().call(method, path, **kwargs)
        except SandboxError as exc:
            if isinstance(exc.__cause__, httpx.TransportError):
                raise _lost(self.node, exc) from exc
            raise


def _lost(node: NodeInfo, why: BaseException) -> SandboxLost:
    """The node is unreachable: tell the registry (it checks the agent and forgets the
    node if it is dead) and say so."""
    try:
        registry().suspect.remote(node.node_id)
    except Exception:  # the registry itself may be gone with the cluster
        pass
    return SandboxLost(f"the sandbox's node {node.node_id[:12]} ({node.url}) is lost: {why}")


def _agent_dead(node: NodeInfo) -> bool:
    try:
        ray.get(nodes_.agent(node).ping.remote(), timeout=5.0)
    except Exception:
        return True
    return False


@dataclass(frozen=True, kw_only=True)
class RayOptions(SandboxOptions):
    """:class:`SandboxOptions` plus where on the cluster."""

    placement: Strategy = "spread"


class Sandbox(RemoteSandbox):
    """A sandbox on the least (``spread``) or most (``pack``) loaded node with room."""

    _api: NodeApi

    @takes(RayOptions)
    def __init__(self, options: RayOptions) -> None:
        if options.server is not None:
            raise ConfigError("ember.ray.Sandbox picks its node: do not pass server=")
        body = options.daemon_body()
        errors: builtins.list[str] = []
        for cap in _candidates(options.mem_mib, options.placement, options.template):
            handle = nodes_.agent(cap.node)
            try:
                ticket = ray.get(handle.reserve.remote(options.mem_mib), timeout=30.0)
            except (ray.exceptions.RayError, ValueError) as exc:
                errors.append(f"{cap.node.node_id[:12]}: {type(exc).__name__}")
                continue
            if ticket is None:
                errors.append(f"{cap.node.node_id[:12]}: full")
                continue
            api = NodeApi(cap.node)
            try:
                if options.template is not None and options.template not in cap.templates:
                    _ensure_template(handle, options.template)
                info = api.call("POST", "/sandboxes", json=body)
            except SandboxLost as exc:
                api.close()
                errors.append(f"{cap.node.node_id[:12]}: {exc}")
                continue
            except BaseException:
                api.close()
                raise
            finally:
                _release(handle, ticket)
            self._init_remote(api, info)
            placed = Placed(self._id, cap.node.node_id, dict(info.get("metadata") or {}),
                            float(info.get("created_at") or time.time()))  # fmt: skip
            try:
                ray.get(registry().record.remote(placed))
            except BaseException:  # unrecorded, nobody could find it: do not leave it behind
                self.close()
                raise
            return
        why = "; ".join(errors) or "no node agents (does any node have an ember_kvm resource?)"
        raise SandboxError(f"no node has room for a {options.mem_mib} MiB sandbox: {why}")

    @property
    def node(self) -> NodeInfo:
        """The node holding this sandbox."""
        return self._api.node

    # --- lost nodes
    def _do(self, request: daemon.Request[T]) -> T:
        try:
            return super()._do(request)
        except ServerError as exc:
            if exc.code == "not_found" and _agent_dead(self._api.node):
                raise self._lost(exc) from exc
            raise
        except SandboxLost:
            registry().forget.remote(self._id)
            raise

    def _lost(self, why: BaseException) -> SandboxLost:
        registry().forget.remote(self._id)
        return _lost(self._api.node, why)

    def _stream(self, body: dict[str, Any]) -> Iterator[OutputChunk]:
        try:
            return (yield from super()._stream(body))
        except httpx.TransportError as exc:
            raise self._lost(exc) from exc

    def close(self) -> None:
        """Destroy the sandbox (a lost one is gone already: nothing to do)."""
        if self._closed:
            return
        try:
            super().close()
        except SandboxLost:
            pass
        finally:  # awaited: a lookup right after (the registry runs calls concurrently) misses
            _pushes(self._api.node)
            ray.get(registry().forget.remote(self._id))


def _pushes(node: NodeInfo) -> None:
    """Ask the node's agent to push its capacity now (not awaited): the agent does not see
    deletions, which go to its daemon, and placement should not wait up to
    :data:`~ember.ray.node.PUSH_S` to see the freed slot."""
    try:
        nodes_.agent(node).push.remote(False)
    except Exception:  # the agent is gone: nothing to update
        pass


def _candidates(mem_mib: int, placement: Strategy, template: str | None) -> builtins.list[Capacity]:
    found = nodes_.pushed()
    if not found:  # just started, or no agents at all yet
        if not ray.get(registry().nodes.remote()):
            nodes_.start_nodes()
        found = nodes_.nodes()
    return rank(found, mem_mib, placement, template)


def _release(handle: Any, ticket: str) -> None:
    """Give the reservation back, waiting for the agent's push (this driver's next placement
    then sees the new sandbox); an agent that died meanwhile holds no slot to give back."""
    try:
        ray.get(handle.release.remote(ticket), timeout=30.0)
    except (ray.exceptions.RayError, ValueError):
        pass


def _ensure_template(handle: Any, name: str) -> None:
    """The chosen node lacks template ``name``: its agent copies it from a node that has it
    (verified before use); if none has it, the daemon's own error says so."""
    try:
        ray.get(handle.ensure_template.remote(name), timeout=TRANSFER_TIMEOUT_S)
    except ray.exceptions.RayTaskError as exc:
        raise SandboxError(f"template {name!r} could not be copied here: {exc.cause}") from None


def connect(sandbox_id: str) -> Sandbox:
    """The sandbox ``sandbox_id``, made by any driver of this cluster."""
    hit = ray.get(registry().lookup.remote(sandbox_id))
    candidates = [hit[1]] if hit is not None else ray.get(registry().nodes.remote())
    for node in candidates:
        api = NodeApi(node)
        try:
            info = api.call("GET", f"/sandboxes/{sandbox_id}")
        except ServerError as exc:
            api.close()
            if exc.code == "not_found":
                continue
            raise
        except BaseException:
            api.close()
            raise
        sb = object.__new__(Sandbox)
        sb._init_remote(api, info)
        if hit is None:
            ray.get(registry().record.remote(Placed(sandbox_id, node.node_id, info["metadata"],
                                                    info["created_at"])))  # fmt: skip
        return sb
    raise SandboxError(f"no sandbox {sandbox_id!r} in this cluster")


def list(*, metadata: dict[str, str] | None = None) -> builtins.list[dict[str, Any]]:
    """Every sandbox of the cluster whose metadata include ``metadata``, as its daemon
    reports it (state, template, expires_at, ...) plus ``node``."""
    found: builtins.list[dict[str, Any]] = []
    for node in ray.get(registry().nodes.remote()):
        api = NodeApi(node)
        try:
            reply = api.call("GET", "/sandboxes", params=daemon.list_params(metadata))
        except SandboxLost:
            continue
        finally:
            api.close()
        found.extend({**info, "node": node.node_id} for info in reply["sandboxes"])
    return found


def kill(sandbox_id: str) -> None:
    """Destroy the sandbox ``sandbox_id`` wherever it is."""
    connect(sandbox_id).close()
