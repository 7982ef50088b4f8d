"""Egress policies: parsing, the nftables rules they become, and that nft accepts them."""

from __future__ import annotations

import ipaddress
import subprocess

import pytest

from ember.errors import ConfigError
from ember.network.host import SandboxNetwork, name_set_commands
from ember.network.policy import (
    NON_GLOBAL,
    Allow,
    AllowName,
    NetworkPolicy,
    normalize_name,
    parse_entry,
)


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


def nft_check(ruleset: str) -> None:
    """``nft -c`` parses and checks without changing anything."""
    result = subprocess.run(
        ["nft", "-c", "-f", "-"], input=ruleset.encode(), capture_output=True, check=False
    )
    assert result.returncode == 0, result.stderr.decode() + ruleset


@pytest.mark.parametrize(
    "policy",
    [
        NetworkPolicy(),
        NetworkPolicy(["10.0.0.0/8", "1.2.3.4:80-90"], internet=True),
        NetworkPolicy(["api.example.com:443", "*.pypi.org", "x.test:8000-8100", "10.0.0.1"]),
    ],
)
def test_nft_accepts_the_rulesets(policy: NetworkPolicy) -> None:
    network = SandboxNetwork(slot=7, policy=policy)
    for ruleset in (network.sandbox_ruleset(), network.host_ruleset()):
        nft_check(ruleset)
    assert network.address == "10.253.0.30" and network.host_ip == "10.253.0.29"


# Names -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "pattern", "ports"),
    [
        ("api.example.com", "api.example.com", None),
        ("API.Example.COM.:443", "api.example.com", (443, 443)),
        ("*.pypi.org", "*.pypi.org", None),
        (" *.PyPI.org:8000-8100 ", "*.pypi.org", (8000, 8100)),
        ("_http._tcp.example.com", "_http._tcp.example.com", None),
        ("localhost", "localhost", None),
        ("1e100.net:80", "1e100.net", (80, 80)),
        ("xn--bcher-kva.example", "xn--bcher-kva.example", None),
    ],
)
def test_name_entries_parse(spec: str, pattern: str, ports: tuple[int, int] | None) -> None:
    entry = parse_entry(spec)
    assert isinstance(entry, AllowName)
    assert (entry.pattern, entry.ports) == (pattern, ports)
    assert str(AllowName.parse(str(entry))) == str(entry)


@pytest.mark.parametrize(
    "spec",
    ["*", "*.", "**.example.com", "a.*.example.com", "ex ample.com", "example..com",
     "bücher.example", "10.0.0.256", "1.2.3", "example.com:http", "example.com:0",
     "example.com:", "a" * 64 + ".com", ".".join(["abcdefgh"] * 29) + ".com",
     "example.com/24", "-", "example.com:1-2-3"],
)  # fmt: skip
def test_bad_name_entries_are_config_errors_that_show_the_forms(spec: str) -> None:
    with pytest.raises(ConfigError, match="network allow entry") as caught:
        parse_entry(spec)
    assert "IPv4 address or CIDR" in str(caught.value) or "port" in str(caught.value)


def test_entries_are_addresses_when_they_look_like_addresses() -> None:
    assert isinstance(parse_entry("10.1.2.3:443"), Allow)
    assert isinstance(parse_entry("10.0.0.0/8"), Allow)
    with pytest.raises(ConfigError, match="IPv4 address or CIDR"):
        parse_entry("10.0.0.0/33")
    with pytest.raises(ConfigError, match="IPv4 address or CIDR"):
        parse_entry("::1")


@pytest.mark.parametrize(
    ("pattern", "name", "allowed"),
    [
        ("api.example.com", "api.example.com", True),
        ("api.example.com", "API.EXAMPLE.COM.", True),
        ("api.example.com", "example.com", False),
        ("api.example.com", "x.api.example.com", False),
        ("api.example.com", "api.example.com.evil.net", False),
        ("*.pypi.org", "files.pypi.org", True),
        ("*.pypi.org", "a.b.Pypi.ORG", True),
        ("*.pypi.org", "pypi.org", False),
        ("*.pypi.org", "evilpypi.org", False),
        ("*.pypi.org", "pypi.org.evil.net", False),
    ],
)
def test_names_match_exactly_or_under_a_wildcard(pattern: str, name: str, allowed: bool) -> None:
    normalized = normalize_name(name)
    assert normalized is not None
    assert AllowName.parse(pattern).matches(normalized) is allowed
    assert NetworkPolicy([pattern]).resolves(normalized) is allowed
    assert NetworkPolicy([pattern], internet=True).resolves(normalized)  # the internet: all


@pytest.mark.parametrize("name", ["", ".", "a..b", "caf\u00e9.com", "\u212a.com", "a b.com",
                                  "x\n", "a" * 64, "a." * 127 + "a"])  # fmt: skip
def test_only_plain_dns_names_are_normalized(name: str) -> None:
    assert normalize_name(name) is None


def test_a_policy_keeps_addresses_and_names_apart() -> None:
    policy = NetworkPolicy(
        ["10.1.2.3:443", "api.example.com:443", "*.pypi.org", AllowName.parse("b.test:443")],
        dns_upstream="10.254.3.2",
    )
    assert policy.allow == (Allow.parse("10.1.2.3:443"),)
    assert [str(n) for n in policy.names] == ["api.example.com:443", "*.pypi.org", "b.test:443"]
    assert policy.dns_upstream == ("10.254.3.2", 53)
    assert policy.name_sets() == {"names_443": (443, 443), "names_any": None}
    assert [e.pattern for e in policy.matching("files.pypi.org")] == ["*.pypi.org"]
    assert policy.matching("example.com") == ()
    assert NetworkPolicy(dns_upstream="10.0.0.53:5353").dns_upstream == ("10.0.0.53", 5353)


@pytest.mark.parametrize("upstream", ["resolver.example", "10.0.0.1:0", "10.0.0.1:x", "::1"])
def test_a_bad_dns_upstream_is_a_config_error(upstream: str) -> None:
    with pytest.raises(ConfigError, match="dns_upstream"):
        NetworkPolicy(dns_upstream=upstream)


def test_names_become_sets_that_the_egress_chain_accepts_on_their_ports() -> None:
    policy = NetworkPolicy(["a.test:443", "b.test:443", "*.c.test", "d.test:8000-8100"])
    assert policy.set_declarations() == [
        f"set {name} {{ type ipv4_addr; flags timeout; size 4096; }}"
        for name in ("names_443", "names_any", "names_8000_8100")
    ]
    rules = policy.egress_rules()
    assert "ip daddr @names_443 meta l4proto { tcp, udp } th dport 443 accept" in rules
    assert "ip daddr @names_any accept" in rules
    assert "ip daddr @names_8000_8100 meta l4proto { tcp, udp } th dport 8000-8100 accept" in rules
    assert rules[-2:] == [
        "meta l4proto tcp reject with tcp reset",
        "reject with icmp type admin-prohibited",
    ]
    assert policy.host_rules() == []  # a DNS answer never opens the host itself


def test_the_resolver_is_open_to_the_guest_alone() -> None:
    ruleset = SandboxNetwork(slot=3, policy=NetworkPolicy()).sandbox_ruleset()
    dns_rule = [line.strip() for line in ruleset.splitlines() if "dport 53" in line]
    assert dns_rule == [
        'iifname "tap0" ip saddr 172.16.0.2 ip daddr 172.16.0.1 '
        "meta l4proto { tcp, udp } th dport 53 accept"
    ]
    assert ruleset.index("dport 53") < ruleset.index('iifname "tap0" meta l4proto tcp reject')


def test_opening_addresses_replaces_their_timeout_in_one_transaction() -> None:
    elements = [
        ("names_443", ipaddress.IPv4Address("1.2.3.4"), 60),
        ("names_any", ipaddress.IPv4Address("5.6.7.8"), 3600),
    ]
    commands = name_set_commands(elements)
    assert commands.splitlines()[:3] == [
        "add element ip ember names_443 { 1.2.3.4 timeout 60s }",
        "delete element ip ember names_443 { 1.2.3.4 }",
        "add element ip ember names_443 { 1.2.3.4 timeout 60s }",
    ]
    policy = NetworkPolicy(["a.test:443", "b.test"])
    nft_check(SandboxNetwork(slot=1, policy=policy).sandbox_ruleset() + commands)


def test_a_policy_travels_to_a_daemon_and_back() -> None:
    policy = NetworkPolicy(["10.0.0.5:443", "192.168.1.0/24", "*.pypi.org:443"], internet=True)
    again = NetworkPolicy.from_json(policy.to_json())
    assert again == policy and again.egress_rules() == policy.egress_rules()
    assert NetworkPolicy.from_json(True) == NetworkPolicy(internet=True)
    with pytest.raises(ConfigError):
        NetworkPolicy.from_json({"allow": ["not an address:99999"]})
    with pytest.raises(ConfigError):
        NetworkPolicy.from_json("everything")
