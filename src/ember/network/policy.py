"""What a networked sandbox may reach, and the nftables rules that enforce it.

A policy is an allow-list: every destination not on it is refused (TCP with
a reset, anything else with ICMP "administratively prohibited", so a
script fails at once instead of timing out).  ``internet=True`` adds every
globally routable IPv4 address, never the private, loopback, link-local
and shared ranges, where the host, its LAN and the other sandboxes live.

The rules are rendered here as text for ``nft -f``, so they can be tested
without a network namespace; :mod:`ember.network.host` loads them.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field

from ember.errors import ConfigError

# Never "the internet": where the host, its LAN and the other sandboxes are.
NON_GLOBAL = (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
    "172.16.0.0/12", "192.0.0.0/24", "192.168.0.0/16", "198.18.0.0/15", "224.0.0.0/4",
    "240.0.0.0/4",
)  # fmt: skip


@dataclass(frozen=True)
class Allow:
    """One allowed destination: a network and, optionally, a port range (TCP and UDP)."""

    network: ipaddress.IPv4Network
    ports: tuple[int, int] | None = None

    @classmethod
    def parse(cls, spec: str) -> Allow:
        """``CIDR``, ``ADDR``, ``CIDR:PORT`` or ``CIDR:FIRST-LAST``."""
        text = spec.strip()
        address, sep, port_text = text.partition(":")
        try:
            network = ipaddress.IPv4Network(address, strict=False)
        except ValueError:
            raise ConfigError(
                f"network allow entry {spec!r}: expected an IPv4 address or CIDR, "
                "optionally with :PORT or :FIRST-LAST (10.0.0.0/8, 10.1.2.3:443)"
            ) from None
        if not sep:
            return cls(network)
        first, dash, last = port_text.partition("-")
        try:
            low, high = int(first), int(last if dash else first)
        except ValueError:
            raise ConfigError(
                f"network allow entry {spec!r}: {port_text!r} is not a port"
            ) from None
        if not 1 <= low <= high <= 65535:
            raise ConfigError(f"network allow entry {spec!r}: ports must be 1-65535, low to high")
        return cls(network, (low, high))

    def rule(self) -> str:
        """This entry as one nftables rule."""
        match = f"ip daddr {self.network}"
        if self.ports is None:
            return f"{match} accept"
        low, high = self.ports
        ports = str(low) if low == high else f"{low}-{high}"
        return f"{match} meta l4proto {{ tcp, udp }} th dport {ports} accept"

    def __str__(self) -> str:
        if self.ports is None:
            return str(self.network)
        low, high = self.ports
        return f"{self.network}:{low}" + (f"-{high}" if high != low else "")


@dataclass(frozen=True)
class NetworkPolicy:
    """Egress rules of one sandbox: ``allow`` entries, plus the public internet if asked.

    ``NetworkPolicy()`` allows nothing out (ports can still be exposed);
    ``Sandbox(network=True)`` means ``NetworkPolicy(internet=True)``.
    """

    allow: tuple[Allow, ...] = field(default=())
    internet: bool = False

    def __init__(self, allow: Iterable[str | Allow] = (), *, internet: bool = False) -> None:
        if isinstance(allow, str):
            raise ConfigError("allow= takes a list of entries, not one string")
        entries = tuple(a if isinstance(a, Allow) else Allow.parse(a) for a in allow)
        object.__setattr__(self, "allow", entries)
        object.__setattr__(self, "internet", internet)

    @classmethod
    def coerce(cls, network: bool | NetworkPolicy | None) -> NetworkPolicy | None:
        """The SDK's ``network=``: None/False (off), True (internet), or a policy."""
        if network is None or network is False:
            return None
        if network is True:
            return cls(internet=True)
        if isinstance(network, NetworkPolicy):
            return network
        raise ConfigError(f"network= takes True, False or a NetworkPolicy, not {network!r}")

    def egress_rules(self) -> list[str]:
        """The body of the sandbox namespace's egress chain: allows, then refusals."""
        rules = [entry.rule() for entry in self.allow]
        if self.internet:
            rules.append(f"ip daddr != {{ {', '.join(NON_GLOBAL)} }} accept")
        rules += [
            "meta l4proto tcp reject with tcp reset",
            "reject with icmp type admin-prohibited",
        ]
        return rules

    def host_rules(self) -> list[str]:
        """Rules for packets from this sandbox to the host itself (its input hook).

        Only explicit entries count: ``internet`` never opens the host, even
        on a public address of its own.
        """
        return [entry.rule() for entry in self.allow]
