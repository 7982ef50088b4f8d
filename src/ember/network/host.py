"""The host side of one networked sandbox: its network namespace, TAP, routes and firewall.

::

    guest eth0 172.16.0.2/30 ──virtio-net── tap0 172.16.0.1/30   (namespace ember-K)
                                                 │ forward: egress allow-list, masquerade
                                            eth0 10.253.x.(4K+2)/30
                                                 │ veth
    host (root namespace)                  emberK 10.253.x.(4K+1)/30

Every sandbox is an L2 segment of its own, so the guest side (addresses,
MACs) is the same in all of them and is part of the template snapshot;
only the namespace side differs.  The VMM attaches to ``tap0`` by entering
the namespace for one ``open``; it then leaves it and jails itself.

Rules: in the sandbox namespace, a forward chain lets the guest's packets
out only through the policy, refuses the rest, and lets in only replies and
exposed ports (DNAT); its input chain refuses everything but DNS from the
guest to the gateway (the namespace offers the guest nothing else).  That
is the sandbox's resolver (:mod:`ember.network.resolver`), which answers
the names the policy allows and opens their addresses in the policy's name
sets, which the egress chain accepts.  In the host namespace, one ``inet ember``
table drops packets from the sandbox veths to the host's own addresses
unless the sandbox's policy names them.  Packets between sandboxes go
through the host's routing, so ``net.ipv4.ip_forward`` is turned on.

Set-up runs ``ip`` and ``nft`` (iproute2, nftables) as root.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field

from ember.errors import ConfigError, SandboxError
from ember.network.commands import _Command, _finish, _run, _start, _stop
from ember.network.policy import NetworkPolicy
from ember.network.resolver import DNS_PORT, Element, SandboxResolver, guest_sockets
from ember.network.slots import LOCK_DIR as LOCK_DIR  # re-exported: the slots' names
from ember.network.slots import NETNS_DIR as NETNS_DIR
from ember.network.slots import NS_PREFIX as NS_PREFIX
from ember.network.slots import POOL as POOL
from ember.network.slots import SLOTS as SLOTS
from ember.network.slots import VETH_PREFIX as VETH_PREFIX
from ember.network.slots import _claim_slot

TAP_NAME = "tap0"
TAP_MAC = "02:65:6d:62:00:01"
GUEST_IP = "172.16.0.2"
GATEWAY_IP = "172.16.0.1"
GUEST_CIDR = f"{GUEST_IP}/30"
HOST_TABLE = "ember"
CLOSED = NetworkPolicy()  # lets nothing out: what a namespace waiting in the pool enforces


@dataclass
class SandboxNetwork:
    """One sandbox's namespace, veth, TAP and rules; :meth:`close` removes them all."""

    slot: int
    policy: NetworkPolicy
    lock_fd: int = -1  # flock held while the slot is ours: a dead owner's slot is reusable
    exposed: set[int] = field(default_factory=set)
    resolver: SandboxResolver | None = None
    # The resolver's sockets, bound in the namespace until the resolver takes them.
    _sockets: tuple[socket.socket, socket.socket] | None = field(default=None, repr=False)
    _pending: list[_Command] = field(default_factory=list, repr=False)  # apply()'s nft runs

    @property
    def netns(self) -> str:
        return f"{NS_PREFIX}{self.slot}"

    @property
    def netns_path(self) -> str:
        return f"{NETNS_DIR}/{self.netns}"

    @property
    def veth(self) -> str:
        return f"{VETH_PREFIX}{self.slot}"

    @property
    def host_chain(self) -> str:
        """This sandbox's chain in the host table (its rules for packets to the host)."""
        return f"sandbox{self.slot}"

    @property
    def host_ip(self) -> str:
        return str(POOL.network_address + 4 * self.slot + 1)

    @property
    def address(self) -> str:
        """The sandbox's address as the host and other sandboxes see it."""
        return str(POOL.network_address + 4 * self.slot + 2)

    @classmethod
    def create(cls, policy: NetworkPolicy) -> SandboxNetwork:
        """A network enforcing ``policy``, built whole on the caller's thread."""
        network = cls.prepare(policy)
        try:
            network.wait_applied()
        except BaseException:
            network.close()
            raise
        return network

    @classmethod
    def prepare(cls, policy: NetworkPolicy = CLOSED) -> SandboxNetwork:
        """A free slot's namespace, veth, TAP and rules for ``policy``, its resolver's
        sockets bound but the resolver not started (:meth:`wait_applied` starts it).

        With the default (:data:`CLOSED`) nothing depends on a sandbox: this is what
        the pool (:mod:`ember.network.pool`) makes ahead of time; :meth:`apply`
        then loads the sandbox's own policy over it.
        """
        _require_root()
        slot, lock_fd = _claim_slot()
        network = cls(slot, policy, lock_fd)
        try:
            network._build()
        except BaseException:
            network.close()
            raise
        return network

    @classmethod
    def adopt(cls, slot: int, policy: NetworkPolicy, exposed: Sequence[int] = ()) -> SandboxNetwork:
        """The network of a sandbox whose VMM outlived the process that made it (a daemon
        restarted): take its slot's lock again, and start its resolver, which lived in that
        process. The namespace, TAP and rules are the kernel's and still in place."""
        _require_root()
        fd = os.open(f"{LOCK_DIR}/{slot}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SandboxError(f"network slot {slot} is held by another process") from None
        network = cls(slot, policy, fd, set(exposed))
        try:
            if not os.path.exists(network.netns_path):
                raise SandboxError(f"the namespace of network slot {slot} is gone")
            network.wait_applied()
        except BaseException:
            network.close()
            raise
        return network

    def _build(self) -> None:
        # The host's table first, in parallel: it names the veth, it does not need it.
        host_rules = _start(["nft", "-f", "-"], self.host_ruleset(), sysctls=_HOST_SYSCTLS)
        try:
            self._build_namespace()
        finally:
            _finish(host_rules)
        self._sockets = guest_sockets(self.netns_path, GATEWAY_IP, DNS_PORT)

    def apply(self, policy: NetworkPolicy) -> bool:
        """Start loading ``policy`` over the rules of a prepared network (not yet in use).

        Only what differs is loaded: the name sets and egress rules in the
        namespace, the rules for the host in this slot's host chain; nothing
        if the network was prepared for ``policy`` itself.  ``nft`` runs while
        the caller goes on (a VMM restoring); :meth:`wait_applied` waits for it.
        Returns whether the guest may run meanwhile: only if the rules being
        replaced are :data:`CLOSED` (nothing gets out) or already the policy's.
        """
        if self._pending or self.resolver is not None:
            raise SandboxError(f"network slot {self.slot} is in use: its policy is set")
        old, self.policy = self.policy, policy
        if policy == old:
            return True
        declarations = dict(zip(policy.name_sets(), policy.set_declarations(), strict=True))
        sets = "".join(
            f"add {text.replace('set ', 'set ip ember ', 1)}\n"
            for name, text in declarations.items()
            if name not in old.name_sets()
        )
        egress = "".join(f"add rule ip ember egress {rule}\n" for rule in policy.egress_rules())
        unused = "".join(
            f"delete set ip ember {name}\n" for name in old.name_sets() if name not in declarations
        )  # after the flush: the old rules referred to them
        rules = f"{sets}flush chain ip ember egress\n{egress}{unused}"
        self._pending.append(_start(["nft", "-f", "-"], rules, netns=self.netns_path))
        chain = f"inet {HOST_TABLE} {self.host_chain}"
        host_rules = "".join(f"add rule {chain} {rule}\n" for rule in policy.host_rules())
        if host_rules or old.host_rules():
            self._pending.append(_start(["nft", "-f", "-"], f"flush chain {chain}\n{host_rules}"))
        return old == CLOSED

    def wait_rules(self) -> None:
        """Wait for the rules :meth:`apply` is loading (SandboxError if one failed)."""
        pending, self._pending = self._pending, []
        try:
            for command in pending:
                _finish(command)
        finally:
            _stop(pending)  # one failed: do not leave the others running

    def wait_applied(self) -> None:
        """Wait for :meth:`apply`'s rules, then serve DNS for the policy: the sandbox is ready."""
        self.wait_rules()
        sockets, self._sockets = self._sockets, None
        self.resolver = SandboxResolver.start(
            self.netns_path, self.policy, self.open_names, address=GATEWAY_IP,
            guest_ip=GUEST_IP, sockets=sockets,
        )  # fmt: skip

    def _build_namespace(self) -> None:
        _run(
            ["ip", "-batch", "-"],
            f"netns add {self.netns}\n"
            f"link add {self.veth} type veth peer name eth0 netns {self.netns}\n"
            f"addr add {self.host_ip}/30 dev {self.veth}\n"
            f"link set {self.veth} up\n",
        )
        _run(
            ["ip", "-batch", "-"],
            "link set lo up\n"
            f"tuntap add dev {TAP_NAME} mode tap vnet_hdr\n"
            f"link set {TAP_NAME} address {TAP_MAC}\n"
            f"addr add {GATEWAY_IP}/30 dev {TAP_NAME}\n"
            f"link set {TAP_NAME} up\n"
            f"addr add {self.address}/30 dev eth0\n"
            "link set eth0 up\n"
            f"route add default via {self.host_ip}\n",
            netns=self.netns_path,
            sysctls=_SANDBOX_SYSCTLS,
        )
        _run(["nft", "-f", "-"], self.sandbox_ruleset(), netns=self.netns_path)

    def sandbox_ruleset(self) -> str:
        egress = "\n".join(f"    {rule}" for rule in self.policy.egress_rules())
        sets = "".join(f"  {declaration}\n" for declaration in self.policy.set_declarations())
        # The resolver, for the guest alone: it must not answer (reflect) to any other address.
        dns = f"ip saddr {GUEST_IP} ip daddr {GATEWAY_IP} meta l4proto {{ tcp, udp }} "
        dns += f"th dport {DNS_PORT}"
        return f"""table ip ember {{
{sets}  chain prerouting {{ type nat hook prerouting priority dstnat; }}
  chain postrouting {{
    type nat hook postrouting priority srcnat;
    oifname "eth0" masquerade
  }}
  chain egress {{
{egress}
  }}
  chain forward {{
    type filter hook forward priority filter; policy drop;
    ct state established,related accept
    iifname "eth0" oifname "{TAP_NAME}" ct status dnat accept
    iifname "{TAP_NAME}" oifname "eth0" jump egress
  }}
  chain input {{
    type filter hook input priority filter; policy drop;
    ct state established,related accept
    iifname "lo" accept
    iifname "{TAP_NAME}" {dns} accept
    iifname "{TAP_NAME}" meta l4proto tcp reject with tcp reset
    iifname "{TAP_NAME}" reject with icmp type admin-prohibited
  }}
}}
"""

    def host_ruleset(self) -> str:
        """The host table (made once, kept) and this sandbox's chain in its verdict map."""
        chain = self.host_chain
        rules = "".join(
            f"add rule inet {HOST_TABLE} {chain} {r}\n" for r in self.policy.host_rules()
        )
        return (
            f"add table inet {HOST_TABLE}\n"
            f"add map inet {HOST_TABLE} sandboxes {{ type ifname : verdict; }}\n"
            f"add chain inet {HOST_TABLE} input "
            "{ type filter hook input priority filter - 10; policy accept; }\n"
            f"add chain inet {HOST_TABLE} {chain}\n"
            f"flush chain inet {HOST_TABLE} {chain}\n"
            f"{rules}"
            f'add element inet {HOST_TABLE} sandboxes {{ "{self.veth}" : jump {chain} }}\n'
            + _host_input_rules()
        )

    def open_names(self, elements: Sequence[Element]) -> None:
        """Open resolved addresses in the name sets (the resolver calls this, in a thread)."""
        _run(["nft", "-f", "-"], name_set_commands(elements), netns=self.netns_path)

    def expose(self, port: int) -> tuple[str, int]:
        """Forward TCP ``port`` of the sandbox address to the guest; (address, port) to use."""
        if not 1 <= port <= 65535:
            raise ConfigError(f"port {port} is out of range (1-65535)")
        if port not in self.exposed:
            _run(
                ["nft", "-f", "-"],
                f'add rule ip ember prerouting iifname "eth0" tcp dport {port} '
                f"dnat to {GUEST_IP}:{port}\n",
                netns=self.netns_path,
            )
            self.exposed.add(port)
        return self.address, port

    def close(self) -> None:
        """Remove the host rules and the namespace (its veth and TAP go with it)."""
        _stop(self._pending)  # an apply() still running
        self._pending = []
        if self.resolver is not None:  # first: its sockets would keep the namespace alive
            self.resolver.close()
            self.resolver = None
        self._close_sockets()
        undo = (
            (
                ["nft", "-f", "-"],
                f'delete element inet {HOST_TABLE} sandboxes {{ "{self.veth}" }}\n'
                f"delete chain inet {HOST_TABLE} {self.host_chain}\n",
            ),
            (["ip", "netns", "delete", self.netns], ""),
        )
        commands = []
        for argv, stdin in undo:  # both at once, each on its own: they do not depend on each other
            with contextlib.suppress(SandboxError):
                commands.append(_start(argv, stdin))
        for command in commands:
            with contextlib.suppress(SandboxError):
                _finish(command)
        if self.lock_fd >= 0:
            os.close(self.lock_fd)  # the slot is free again
            self.lock_fd = -1

    def _close_sockets(self) -> None:
        """The resolver's sockets, if no resolver took them."""
        if self._sockets is not None:
            for sock in self._sockets:
                sock.close()
            self._sockets = None

    def forget(self) -> None:
        """In a forked child: close this process's copies of the lock and the sockets, and
        nothing else (the namespace and the slot are the parent's)."""
        self._close_sockets()
        if self.lock_fd >= 0:
            os.close(self.lock_fd)
            self.lock_fd = -1


def name_set_commands(elements: Sequence[Element]) -> str:
    """nft commands opening each address in its set of the sandbox table for its seconds.

    nftables cannot change the timeout of an element in place, so each one
    is added (nothing happens if it is there), deleted and added again with
    the new timeout, all in one transaction: atomic, so an address already
    open never closes in between.
    """
    commands = []
    for set_name, address, seconds in elements:
        where = f"element ip ember {set_name}"
        commands += [
            f"add {where} {{ {address} timeout {seconds}s }}",
            f"delete {where} {{ {address} }}",
            f"add {where} {{ {address} timeout {seconds}s }}",
        ]
    return "".join(f"{command}\n" for command in commands)


def _host_input_rules() -> str:
    """The input chain's body, rewritten whole so that it never holds the rules twice."""
    table = f"inet {HOST_TABLE}"
    return (
        f"flush chain {table} input\n"
        f'add rule {table} input iifname != "{VETH_PREFIX}*" accept\n'
        f"add rule {table} input ct state established,related accept\n"
        f"add rule {table} input iifname vmap @sandboxes\n"
        f'add rule {table} input iifname "{VETH_PREFIX}*" meta l4proto tcp reject with tcp reset\n'
        f'add rule {table} input iifname "{VETH_PREFIX}*" drop\n'
    )


# Forwarding on; no IPv6 in the sandbox namespace: the guest has none, and every router
# or neighbour solicitation a TAP with a link-local address sends would cost it time.
_SANDBOX_SYSCTLS = {
    "ipv4/ip_forward": "1",
    "ipv6/conf/all/disable_ipv6": "1",
    "ipv6/conf/default/disable_ipv6": "1",
}
_HOST_SYSCTLS = {"ipv4/ip_forward": "1"}


def _require_root() -> None:
    if os.geteuid() != 0:
        raise ConfigError("sandbox networking needs root (network namespaces, TAP, nftables)")
