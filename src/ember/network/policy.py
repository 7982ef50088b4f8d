"""What a networked sandbox may reach, and the nftables rules that enforce it.

A policy is an allow-list: every destination not on it is refused (TCP with
a reset, anything else with ICMP "administratively prohibited", so a
script fails at once instead of timing out).  ``internet=True`` adds every
globally routable IPv4 address, never the private, loopback, link-local
and shared ranges, where the host, its LAN and the other sandboxes live.

Entries are addresses (:class:`Allow`) or DNS names (:class:`AllowName`,
``api.example.com:443`` or ``*.pypi.org``).  A name cannot be a firewall
rule by itself: packets carry addresses.  So each port range named by name
entries gets an nftables set with timeouts, and the sandbox's resolver
(:mod:`ember.network.resolver`) adds the addresses it hands the guest for
an allowed name to that name's set, for the answer's TTL.  An address the
guest never resolved through it stays refused.

The rules are rendered here as text for ``nft -f``, so they can be tested
without a network namespace; :mod:`ember.network.host` loads them.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ember.errors import ConfigError

# Never "the internet": where the host, its LAN and the other sandboxes are.
NON_GLOBAL = (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
    "172.16.0.0/12", "192.0.0.0/24", "192.168.0.0/16", "198.18.0.0/15", "224.0.0.0/4",
    "240.0.0.0/4",
)  # fmt: skip

# Addresses one name set may hold at once: a bound on the kernel memory a guest can make
# the host spend by resolving ever new names under a wildcard (elements expire with TTLs).
NAME_SET_SIZE = 4096

# A DNS name as Ember accepts it, lowercase: labels of letters, digits, '-' and '_'
# (service names such as _http._tcp), 1-63 bytes each, 253 in all (RFC 1035 2.3.4).
_LABEL = r"[a-z0-9_-]{1,63}"
_NAME = re.compile(rf"{_LABEL}(\.{_LABEL})*")
MAX_NAME = 253


def normalize_name(name: str) -> str | None:
    """``name`` lowercased without its trailing dot, or None if it is not a DNS name Ember
    serves (DNS compares names case-insensitively, RFC 4343)."""
    if not name.isascii():  # before lower(): it maps some non-ASCII letters to ASCII ones
        return None
    name = name.lower().removesuffix(".")
    if len(name) > MAX_NAME or not _NAME.fullmatch(name):
        return None
    return name


def _parse_ports(spec: str, text: str) -> tuple[int, int]:
    first, dash, last = text.partition("-")
    try:
        low, high = int(first), int(last if dash else first)
    except ValueError:
        raise ConfigError(f"network allow entry {spec!r}: {text!r} is not a port") from None
    if not 1 <= low <= high <= 65535:
        raise ConfigError(f"network allow entry {spec!r}: ports must be 1-65535, low to high")
    return low, high


def _port_text(ports: tuple[int, int]) -> str:
    low, high = ports
    return str(low) if low == high else f"{low}-{high}"


def _port_match(ports: tuple[int, int] | None) -> str:
    return "" if ports is None else f" meta l4proto {{ tcp, udp }} th dport {_port_text(ports)}"


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
        return cls(network, _parse_ports(spec, port_text) if sep else None)

    def rule(self) -> str:
        """This entry as one nftables rule."""
        return f"ip daddr {self.network}{_port_match(self.ports)} accept"

    def __str__(self) -> str:
        if self.ports is None:
            return str(self.network)
        return f"{self.network}:{_port_text(self.ports)}"


@dataclass(frozen=True)
class AllowName:
    """One allowed DNS name: exact (``api.example.com``) or every name under a suffix
    (``*.pypi.org``: ``files.pypi.org``, ``a.b.pypi.org``, not ``pypi.org`` itself, as
    in TLS certificates; list both for both), optionally with ports as :class:`Allow`.

    The guest reaches the addresses the sandbox's resolver gave it for a matching
    name, on these ports, until the answer's TTL runs out.
    """

    pattern: str  # lowercase, no trailing dot; a wildcard keeps its "*."
    ports: tuple[int, int] | None = None

    @classmethod
    def parse(cls, spec: str) -> AllowName:
        """``NAME``, ``*.SUFFIX``, either with ``:PORT`` or ``:FIRST-LAST``."""
        text = spec.strip()
        name_text, sep, port_text = text.partition(":")
        wildcard = name_text.startswith("*.")
        name = normalize_name(name_text[2:] if wildcard else name_text)
        if (
            name is None
            or name.rsplit(".", 1)[-1].isdigit()  # 10.0.0.256 is a mistyped address
            or any(label.startswith("-") or label.endswith("-") for label in name.split("."))
        ):
            raise ConfigError(
                f"network allow entry {spec!r}: expected an IPv4 address or CIDR, or a DNS "
                "name (api.example.com, or *.example.com for every name under it; letters, "
                "digits, '-' and '_', an international name in its xn-- form), optionally "
                "with :PORT or :FIRST-LAST"
            )
        return cls(
            f"*.{name}" if wildcard else name, _parse_ports(spec, port_text) if sep else None
        )

    def matches(self, name: str) -> bool:
        """Whether ``name`` (normalized: see :func:`normalize_name`) is allowed by this entry."""
        if self.pattern.startswith("*."):
            return name.endswith(self.pattern[1:])
        return name == self.pattern

    @property
    def set_name(self) -> str:
        """The nftables set holding the addresses resolved for this entry's ports."""
        return name_set(self.ports)

    def __str__(self) -> str:
        return self.pattern if self.ports is None else f"{self.pattern}:{_port_text(self.ports)}"


def name_set(ports: tuple[int, int] | None) -> str:
    """One set per port range, shared by the name entries that name it."""
    return "names_any" if ports is None else f"names_{_port_text(ports).replace('-', '_')}"


def parse_entry(spec: str) -> Allow | AllowName:
    """An allow entry: an address entry if it starts with an IPv4 address or CIDR, else a name."""
    host = spec.strip().partition(":")[0]
    if host.replace(".", "").replace("/", "").isdigit() or not host:
        return Allow.parse(spec)
    return AllowName.parse(spec)


def parse_upstream(spec: str) -> tuple[str, int]:
    """``ADDR`` or ``ADDR:PORT`` (IPv4): the DNS server a sandbox's resolver forwards to."""
    address, sep, port_text = spec.strip().partition(":")
    try:
        ipaddress.IPv4Address(address)
        port = int(port_text) if sep else 53
    except ValueError:
        port = 0
    if not 1 <= port <= 65535:
        raise ConfigError(
            f"dns_upstream {spec!r}: expected an IPv4 address, optionally with :PORT "
            "(10.0.0.53 or 10.0.0.53:5353)"
        )
    return address, port


@dataclass(frozen=True)
class NetworkPolicy:
    """Egress rules of one sandbox: ``allow`` entries, plus the public internet if asked.

    ``NetworkPolicy()`` allows nothing out (ports can still be exposed);
    ``Sandbox(network=True)`` means ``NetworkPolicy(internet=True)``.
    """

    allow: tuple[Allow, ...] = field(default=())
    internet: bool = False
    names: tuple[AllowName, ...] = field(default=())
    # Where the sandbox's resolver forwards allowed names; None: the host's /etc/resolv.conf.
    dns_upstream: tuple[str, int] | None = None

    def __init__(
        self,
        allow: Iterable[str | Allow | AllowName] = (),
        *,
        internet: bool = False,
        dns_upstream: str | None = None,
    ) -> None:
        if isinstance(allow, str):
            raise ConfigError("allow= takes a list of entries, not one string")
        entries = [a if isinstance(a, Allow | AllowName) else parse_entry(a) for a in allow]
        object.__setattr__(self, "allow", tuple(e for e in entries if isinstance(e, Allow)))
        object.__setattr__(self, "names", tuple(e for e in entries if isinstance(e, AllowName)))
        object.__setattr__(self, "internet", internet)
        upstream = parse_upstream(dns_upstream) if dns_upstream is not None else None
        object.__setattr__(self, "dns_upstream", upstream)

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

    def to_json(self) -> dict[str, Any]:
        """The policy as a daemon takes it and keeps it (``from_json`` gives it back)."""
        return {"allow": [str(e) for e in (*self.allow, *self.names)], "internet": self.internet}

    @classmethod
    def from_json(cls, obj: object) -> NetworkPolicy:
        """A policy from :meth:`to_json`'s form; ``True`` is the internet, as ``network=True``.
        Every entry is parsed as the SDK's are (ConfigError for a bad one)."""
        if obj is True:
            return cls(internet=True)
        if not isinstance(obj, dict) or not isinstance(obj.get("allow", []), list):
            raise ConfigError(
                f"a network policy is {{'allow': [...], 'internet': bool}}, not {obj!r:.80}"
            )
        allow = [str(entry) for entry in obj.get("allow", [])]
        return cls(allow, internet=bool(obj.get("internet", False)))

    def matching(self, name: str) -> tuple[AllowName, ...]:
        """The name entries allowing ``name`` (normalized)."""
        return tuple(entry for entry in self.names if entry.matches(name))

    def resolves(self, name: str) -> bool:
        """Whether the sandbox's resolver answers ``name`` (else NXDOMAIN): a name entry
        matches it, or the policy allows the internet, whose addresses need no set."""
        return self.internet or any(entry.matches(name) for entry in self.names)

    def name_sets(self) -> dict[str, tuple[int, int] | None]:
        """Set name -> the ports it opens, one per distinct port range of the name entries."""
        return {entry.set_name: entry.ports for entry in self.names}

    def set_declarations(self) -> list[str]:
        """The name sets, for the sandbox table: addresses that expire on their own."""
        return [
            f"set {name} {{ type ipv4_addr; flags timeout; size {NAME_SET_SIZE}; }}"
            for name in self.name_sets()
        ]

    def egress_rules(self) -> list[str]:
        """The body of the sandbox namespace's egress chain: allows, then refusals."""
        rules = [entry.rule() for entry in self.allow]
        rules += [f"ip daddr @{s}{_port_match(p)} accept" for s, p in self.name_sets().items()]
        if self.internet:
            rules.append(f"ip daddr != {{ {', '.join(NON_GLOBAL)} }} accept")
        rules += [
            "meta l4proto tcp reject with tcp reset",
            "reject with icmp type admin-prohibited",
        ]
        return rules

    def host_rules(self) -> list[str]:
        """Rules for packets from this sandbox to the host itself (its input hook).

        Only explicit address entries count: ``internet`` never opens the host,
        even on a public address of its own, and neither does a name whose
        answer points at it (a DNS answer cannot open the host).
        """
        return [entry.rule() for entry in self.allow]
