"""DNS messages: a guest's queries (hostile bytes included) and an upstream's answers."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ember.network import dns
from tests.unit.fake_dns import answer as fake_answer


def query(name: bytes, qtype: int = 1, *, ident: int = 0x1234, flags: int = 0x0100) -> bytes:
    labels = b"".join(bytes([len(p)]) + p for p in name.split(b".") if p)
    return (
        struct.pack("!HHHHHH", ident, flags, 1, 0, 0, 0)
        + labels
        + b"\0"
        + struct.pack("!HH", qtype, 1)
    )


EDNS_OPT = b"\0" + struct.pack("!HHIH", 41, 1232, 0, 0)


def with_edns(message: bytes) -> bytes:
    return message[:10] + b"\0\x01" + message[12:] + EDNS_OPT


def test_a_query_is_read_and_its_name_normalized() -> None:
    q = dns.parse_query(with_edns(query(b"Files.PyPI.org", 28)))
    assert (q.id, q.name, q.qtype, q.qclass, q.opcode) == (0x1234, "files.pypi.org", 28, 1, 0)
    assert q.wire == query(b"Files.PyPI.org", 28)[12:]  # echoed as sent, letter case and all


@pytest.mark.parametrize("label", [b"caf\xc3\xa9", b"a b", b"a.b", b"\x00x", b"x\n"], ids=repr)
def test_names_ember_does_not_serve_parse_as_no_name(label: bytes) -> None:
    message = struct.pack("!HHHHHH", 1, 0, 1, 0, 0, 0)
    message += bytes([len(label)]) + label + b"\x04test\0" + struct.pack("!HH", 1, 1)
    assert dns.parse_query(message).name is None


def long_name(labels: int) -> bytes:
    return b".".join([b"a" * 63] * labels)


@pytest.mark.parametrize(
    ("message", "why"),
    [
        (b"", "shorter than a DNS header"),
        (b"\x12\x34\x01\x00\x00\x01", "shorter than a DNS header"),
        (query(b"a.test", flags=0x8180), "a response"),
        (query(b"a.test")[:4] + b"\0\0" + query(b"a.test")[6:], "exactly one question"),
        (query(b"a.test")[:4] + b"\0\2" + query(b"a.test")[6:], "exactly one question"),
        (query(b"a.test")[:6] + b"\0\1" + query(b"a.test")[8:], "no records"),
        (query(b"a.test")[:12] + b"\xc0\x0c" + b"\0\1\0\1", "compression pointer"),
        (query(b"a.test")[:12] + b"\x40abc\0\0\1\0\1", "label type"),
        (query(b"a.test")[:12] + b"\x3fabc", "past the end"),
        (query(b"a.test")[:-1], "no type and class"),
        (query(b"a.test")[:12] + b"\x04test", "past the end"),
        (query(long_name(4)), "longer than 255"),
        (query(b"a.test") + bytes(600), "longer than 512"),
    ],
)
def test_malformed_queries_are_format_errors(message: bytes, why: str) -> None:
    with pytest.raises(dns.DnsFormatError, match=why):
        dns.parse_query(message)


def test_format_errors_answer_queries_only() -> None:
    reply = dns.format_error(query(b"a.test")[:14])
    assert reply is not None
    ident, flags, *counts = struct.unpack("!HHHHHH", reply)
    assert (ident, flags & dns.RCODE, flags & dns.QR, counts) == (0x1234, 1, dns.QR, [0] * 4)
    assert dns.format_error(b"\x12\x34") is None  # not even a header: dropped
    assert dns.format_error(query(b"a.test", flags=0x8180)) is None  # a response: no loops


def test_replies_echo_the_guests_id_rd_and_question() -> None:
    q = dns.parse_query(query(b"Denied.Test", flags=0x0100, ident=7))
    reply = dns.reply(q, dns.Rcode.NXDOMAIN)
    ident, flags, qd, an, ns, ar = struct.unpack_from("!HHHHHH", reply)
    assert (ident, flags, qd, an, ns, ar) == (7, 0x8183, 1, 0, 0, 0)
    assert reply[12:] == q.wire


@given(st.binary(max_size=600))
@settings(max_examples=2000, deadline=None)
def test_any_bytes_parse_or_raise_a_format_error(data: bytes) -> None:
    try:
        dns.parse_query(data)
    except dns.DnsFormatError:
        pass
    dns.format_error(data)


@given(st.binary(max_size=80), st.integers(0, 0xFFFF))
@settings(max_examples=2000, deadline=None)
def test_any_question_after_a_query_header_parses_or_raises(tail: bytes, flags: int) -> None:
    data = struct.pack("!HHHHHH", 1, flags & ~dns.QR, 1, 0, 0, 0) + tail
    try:
        q = dns.parse_query(data)
    except dns.DnsFormatError:
        return
    assert q.name is None or dns.encode_name(q.name).lower() == q.wire[:-4].lower()


RECORDS = {"a.test": (["10.0.0.1", "10.0.0.2"], 300), "b.test": (["10.0.0.9"], 30)}


def upstream(name: str, qtype: int = 1, *, ident: int = 99) -> bytes:
    return fake_answer(RECORDS, dns.build_query(ident, name, qtype, dns.CLASS_IN))


def test_an_answer_gives_its_addresses_and_ttls() -> None:
    answer = dns.parse_answer(upstream("a.test"), 99, "a.test", 1, 1, max_ttl=86400)
    assert answer.rcode == 0 and not answer.truncated and answer.counts == (2, 0, 0)
    assert answer.addresses == {
        ipaddress.IPv4Address("10.0.0.1"): 300,
        ipaddress.IPv4Address("10.0.0.2"): 300,
    }


def test_an_answer_follows_its_cname_chain() -> None:
    answer = dns.parse_answer(upstream("alias.b.test"), 99, "alias.b.test", 1, 1, max_ttl=86400)
    assert answer.addresses == {ipaddress.IPv4Address("10.0.0.9"): 30}


def test_nxdomain_and_other_types_have_no_addresses() -> None:
    assert dns.parse_answer(upstream("c.test"), 99, "c.test", 1, 1, max_ttl=60).rcode == 3
    aaaa = dns.parse_answer(upstream("a.test", 28), 99, "a.test", 28, 1, max_ttl=60)
    assert aaaa.rcode == 0 and aaaa.addresses == {}


def rr(owner: bytes, rtype: int, ttl: int, rdata: bytes) -> bytes:
    return owner + struct.pack("!HHIH", rtype, 1, ttl, len(rdata)) + rdata


def message(name: str, *records: bytes, ident: int = 5, flags: int = 0x8180) -> bytes:
    question = dns.encode_name(name) + struct.pack("!HH", 1, 1)
    return (
        struct.pack("!HHHHHH", ident, flags, 1, len(records), 0, 0) + question + b"".join(records)
    )


def test_ttls_are_capped_for_the_guest_too() -> None:
    data = message(
        "a.test",
        rr(b"\xc0\x0c", 1, 10**6, bytes([10, 0, 0, 1])),
        rr(b"\xc0\x0c", 1, 0x80000001, bytes([10, 0, 0, 2])),  # top bit: RFC 2181 says 0
    )
    answer = dns.parse_answer(data, 5, "a.test", 1, 1, max_ttl=3600)
    assert list(answer.addresses.values()) == [3600, 0]
    ttls = [struct.unpack_from("!I", answer.body, off)[0] for off in (6, 6 + 16)]
    assert ttls == [3600, 0]


def test_records_for_other_names_open_nothing() -> None:
    other = dns.encode_name("evil.test")
    data = message("a.test", rr(other, 1, 60, bytes([10, 6, 6, 6])))
    assert dns.parse_answer(data, 5, "a.test", 1, 1, max_ttl=60).addresses == {}


def test_a_cname_loop_ends() -> None:
    # a.test -> b.test -> a.test, and an address for neither
    b_name = dns.encode_name("b.test")
    data = message("a.test", rr(b"\xc0\x0c", 5, 60, b_name), rr(b_name, 5, 60, b"\xc0\x0c"))
    assert dns.parse_answer(data, 5, "a.test", 1, 1, max_ttl=60).addresses == {}


# Claims one record, of which only the owner's name is there.
CUT_SHORT = message("a.test")[:6] + b"\0\1" + message("a.test")[8:] + b"\xc0\x0c"


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (message("a.test", ident=6), "not the answer"),
        (message("a.test", flags=0x0100), "not the answer"),
        (message("b.test"), "another question"),
        (message("a.test", rr(b"\xc0\x30", 1, 60, bytes(4))), "point back"),  # forward
        (message("a.test", rr(b"\xc0\x1c", 1, 60, bytes(4))), "point back"),  # itself
        (message("a.test", rr(b"\xc0\x0c", 1, 60, bytes(4)))[:-2], "past the end"),
        (message("a.test", rr(b"\xc0\x0c", 5, 60, b"\x05ab")), "past the end|runs past"),
        (CUT_SHORT, "a record runs past"),
    ],
)
def test_bad_answers_are_format_errors(data: bytes, why: str) -> None:
    with pytest.raises(dns.DnsFormatError, match=why):
        dns.parse_answer(data, 5, "a.test", 1, 1, max_ttl=60)


@given(st.binary(max_size=300))
@settings(max_examples=2000, deadline=None)
def test_any_answer_bytes_parse_or_raise_a_format_error(tail: bytes) -> None:
    data = message("a.test")[:6] + tail[:2] + bytes(4) + message("a.test")[12:] + tail[2:]
    try:
        dns.parse_answer(data, 5, "a.test", 1, 1, max_ttl=60)
    except dns.DnsFormatError:
        pass


def test_a_truncated_answer_is_marked_and_has_no_records() -> None:
    data = message("a.test", rr(b"\xc0\x0c", 1, 60, bytes(4)), flags=0x8380)
    answer = dns.parse_answer(data, 5, "a.test", 1, 1, max_ttl=60)
    assert answer.truncated and answer.addresses == {} and answer.counts == (0, 0, 0)


def test_a_relayed_answer_has_the_guests_header_and_question() -> None:
    q = dns.parse_query(query(b"A.Test", ident=0xBEEF))
    answer = dns.parse_answer(upstream("a.test"), 99, "a.test", 1, 1, max_ttl=86400)
    reply = dns.relay(q, answer, limit=512)
    ident, flags, *counts = struct.unpack_from("!HHHHHH", reply)
    assert (ident, flags & ~dns.AA, counts) == (0xBEEF, 0x8180, [1, 2, 0, 0])
    assert reply[12 : 12 + len(q.wire)] == q.wire
    # The guest reads the same records back (the compression pointers still land).
    again = dns.parse_answer(reply, 0xBEEF, "a.test", 1, 1, max_ttl=86400)
    assert again.addresses == answer.addresses


def test_a_relayed_answer_too_big_for_udp_is_truncated() -> None:
    q = dns.parse_query(query(b"big.test", ident=3))
    answer = dns.parse_answer(upstream("big.test"), 99, "big.test", 1, 1, max_ttl=60)
    assert len(answer.addresses) == 60
    full = dns.relay(q, answer, limit=None)
    assert len(full) > 512
    cut = dns.relay(q, answer, limit=512)
    assert len(cut) <= 512
    _, flags, qd, an, ns, ar = struct.unpack_from("!HHHHHH", cut)
    assert flags & dns.TC and (qd, an, ns, ar) == (1, 0, 0, 0)
    assert cut[12:] == q.wire
