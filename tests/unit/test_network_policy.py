"""Egress policies: parsing, the nftables rules they become, and that nft accepts them."""

from __future__ import annotations

import ipaddress
import subprocess

import pytest

from ember.errors import ConfigError
from ember.network.host import SandboxNetwork
from ember.network.policy import NON_GLOBAL, Allow, NetworkPolicy


@pytest.mark.parametrize(
    ("spec", "network", "ports"),
    [
        ("10.0.0.0/8", "10.0.0.0/8", None),
        ("10.1.2.3", "10.1.2.3/32", None),
        ("10.1.2.3:443", "10.1.2.3/32", (443, 443)),
        ("192.168.1.7/24:8000-8100", "192.168.1.0/24", (8000, 8100)),
        (" 1.2.3.4:53 ", "1.2.3.4/32", (53, 53)),
    ],
)
def test_allow_entries_parse(spec: str, network: str, ports: tuple[int, int] | None) -> None:
    entry = Allow.parse(spec)
    assert entry.network == ipaddress.IPv4Network(network)
    assert entry.ports == ports


@pytest.mark.parametrize(
    "spec",
    ["", "example.com", "10.0.0.0/33", "10.0.0.1:", "10.0.0.1:http", "10.0.0.1:0",
     "10.0.0.1:70000", "10.0.0.1:90-80", "::1", "10.0.0.1:1-2-3"],
)  # fmt: skip
def test_bad_allow_entries_are_config_errors(spec: str) -> None:
    with pytest.raises(ConfigError, match="network allow entry"):
        Allow.parse(spec)


def test_rules_match_the_entry() -> None:
    assert Allow.parse("10.0.0.0/8").rule() == "ip daddr 10.0.0.0/8 accept"
    assert Allow.parse("10.1.2.3:443").rule() == (
        "ip daddr 10.1.2.3/32 meta l4proto { tcp, udp } th dport 443 accept"
    )
    assert "th dport 8000-8100 accept" in Allow.parse("10.1.2.3:8000-8100").rule()
    assert str(Allow.parse("10.1.2.3:8000-8100")) == "10.1.2.3/32:8000-8100"


def test_egress_allows_first_then_refuses_everything() -> None:
    rules = NetworkPolicy(["10.1.2.3:443"]).egress_rules()
    assert rules[0] == Allow.parse("10.1.2.3:443").rule()
    assert rules[-2:] == [
        "meta l4proto tcp reject with tcp reset",
        "reject with icmp type admin-prohibited",
    ]
    assert not any("!=" in rule for rule in rules)  # no internet unless asked


def test_internet_excludes_private_ranges_and_never_opens_the_host() -> None:
    policy = NetworkPolicy(internet=True)
    internet = [r for r in policy.egress_rules() if "!=" in r]
    assert len(internet) == 1
    for network in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "127.0.0.0/8"):
        assert network in internet[0]
    assert policy.host_rules() == []
    assert NetworkPolicy(["10.253.0.1:80"], internet=True).host_rules() == [
        Allow.parse("10.253.0.1:80").rule()
    ]


def test_non_global_covers_every_non_global_address() -> None:
    nets = [ipaddress.IPv4Network(n) for n in NON_GLOBAL]
    for probe in ("10.253.0.2", "172.16.0.1", "192.168.1.1", "127.0.0.1", "169.254.1.1",
                  "100.64.0.1", "0.0.0.1", "224.0.0.1", "255.255.255.255"):  # fmt: skip
        address = ipaddress.IPv4Address(probe)
        assert any(address in n for n in nets), probe
    assert not any(ipaddress.IPv4Address("8.8.8.8") in n for n in nets)


def test_coerce_maps_the_sdk_argument() -> None:
    assert NetworkPolicy.coerce(None) is None
    assert NetworkPolicy.coerce(False) is None
    assert NetworkPolicy.coerce(True) == NetworkPolicy(internet=True)
    policy = NetworkPolicy(["10.0.0.0/8"])
    assert NetworkPolicy.coerce(policy) is policy
    with pytest.raises(ConfigError):
        NetworkPolicy.coerce("yes")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="list"):
        NetworkPolicy("10.0.0.0/8")


@pytest.mark.parametrize(
    "policy",
    [NetworkPolicy(), NetworkPolicy(["10.0.0.0/8", "1.2.3.4:80-90"], internet=True)],
)
def test_nft_accepts_the_rulesets(policy: NetworkPolicy) -> None:
    """``nft -c`` parses and checks without changing anything."""
    network = SandboxNetwork(slot=7, policy=policy)
    for ruleset in (network.sandbox_ruleset(), network.host_ruleset()):
        result = subprocess.run(
            ["nft", "-c", "-f", "-"], input=ruleset.encode(), capture_output=True, check=False
        )
        assert result.returncode == 0, result.stderr.decode() + ruleset
    assert network.address == "10.253.0.30" and network.host_ip == "10.253.0.29"
