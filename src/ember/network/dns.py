"""The DNS messages a sandbox's resolver reads and writes (RFC 1035 section 4.1), by hand.

Why by hand rather than a library: the resolver needs a query's one
question, and the A and CNAME records of an answer with their TTLs; a
parser that small can be read whole, stays inside the standard library,
and bounds everything it does by the message's own length.  Every byte a
guest sends passes through :func:`parse_query`, which either returns a
:class:`Question` or raises :class:`DnsFormatError`; nothing else escapes
it, whatever the bytes (tests/unit/test_network_dns.py fuzzes it).

The resolver never forwards a guest's bytes: it asks its upstream a query
of its own (:func:`build_query`, a fresh id, no EDNS) and gives the guest
the upstream's records behind the guest's own header and question
(:func:`relay`).
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from dataclasses import dataclass

from ember.network.policy import normalize_name

HEADER = struct.Struct("!HHHHHH")  # id, flags, qdcount, ancount, nscount, arcount
HEADER_SIZE = HEADER.size
_RR_FIXED = struct.Struct("!HHIH")  # type, class, ttl, rdlength
_QUESTION_FIXED = struct.Struct("!HH")

# A query is one name (at most 255 bytes on the wire) and a few fixed fields; an EDNS OPT
# record may follow.  Anything longer is not a query a stub resolver sends.
MAX_QUERY = 512
# What a client without EDNS takes over UDP (RFC 1035 4.2.1); bigger answers are sent
# truncated, and the client asks again over TCP.
MAX_UDP_REPLY = 512
MAX_WIRE_NAME = 255
MAX_POINTERS = 64  # compression pointers followed in one name (each must point backwards)

QR = 0x8000
OPCODE = 0x7800
AA = 0x0400
TC = 0x0200
RD = 0x0100
RA = 0x0080
RCODE = 0x000F

TYPE_A = 1
TYPE_CNAME = 5
TYPE_OPT = 41
CLASS_IN = 1
# Zone transfers and "everything": never forwarded for a guest (IXFR, AXFR, MAILB, MAILA, ANY).
UNSERVED_TYPES = frozenset({251, 252, 253, 254, 255})


class Rcode(enum.IntEnum):
    NOERROR = 0
    FORMERR = 1
    SERVFAIL = 2
    NXDOMAIN = 3
    NOTIMP = 4
    REFUSED = 5


class DnsFormatError(ValueError):
    """A message that is not well-formed DNS (or not the one expected)."""


@dataclass(frozen=True)
class Question:
    """A guest's query: its header fields, its one question, and that question's bytes."""

    id: int
    flags: int
    name: str | None  # normalized (policy.normalize_name); None: not a name Ember serves
    qtype: int
    qclass: int
    wire: bytes  # the question section as the guest sent it: every reply echoes it

    @property
    def opcode(self) -> int:
        return (self.flags & OPCODE) >> 11


@dataclass(frozen=True)
class Answer:
    """An upstream's answer to one of the resolver's queries."""

    flags: int
    counts: tuple[int, int, int]  # answer, authority, additional
    body: bytes  # the records after the question, TTLs capped
    # IPv4 addresses of the answer's A records for the asked name or its CNAME chain,
    # each with its TTL (the longest, if several records name it).
    addresses: dict[ipaddress.IPv4Address, int]

    @property
    def rcode(self) -> int:
        return self.flags & RCODE

    @property
    def truncated(self) -> bool:
        return bool(self.flags & TC)


def _read_name(data: bytes, offset: int, *, pointers: bool) -> tuple[list[bytes], int]:
    """The labels of the name at ``offset`` and the offset after it (RFC 1035 4.1.4).

    Bounded: a pointer must point before the place it is read from, so a
    name cannot loop; at most MAX_POINTERS of them and MAX_WIRE_NAME bytes.
    """
    labels: list[bytes] = []
    size = 1
    end = -1  # where the name ends in the message, once a pointer was followed
    jumps = 0
    position = offset
    while True:
        if position >= len(data):
            raise DnsFormatError("a name runs past the end of the message")
        length = data[position]
        if length == 0:
            return labels, (position + 1 if end < 0 else end)
        if length & 0xC0 == 0xC0:
            if not pointers:
                raise DnsFormatError("a compression pointer in a query's question")
            if position + 1 >= len(data):
                raise DnsFormatError("a compression pointer runs past the end of the message")
            target = ((length & 0x3F) << 8) | data[position + 1]
            jumps += 1
            if target < HEADER_SIZE or target >= position or jumps > MAX_POINTERS:
                raise DnsFormatError("a compression pointer that does not point back")
            if end < 0:
                end = position + 2
            position = target
            continue
        if length & 0xC0:
            raise DnsFormatError(f"label type {length >> 6} is not supported")
        size += length + 1
        if size > MAX_WIRE_NAME:
            raise DnsFormatError("a name longer than 255 bytes")
        if position + 1 + length > len(data):
            raise DnsFormatError("a label runs past the end of the message")
        labels.append(data[position + 1 : position + 1 + length])
        position += 1 + length


def name_of(labels: list[bytes]) -> str | None:
    """The normalized dotted name of ``labels``, or None if it is not one Ember serves
    (non-ASCII bytes, a dot inside a label, characters outside letters, digits, '-', '_')."""
    if any(b"." in label for label in labels):
        return None
    try:
        text = ".".join(label.decode("ascii") for label in labels)
    except UnicodeDecodeError:
        return None
    return normalize_name(text)


def encode_name(name: str) -> bytes:
    """A normalized name in wire format, uncompressed."""
    out = bytearray()
    for label in name.split(".") if name else []:
        raw = label.encode("ascii")
        out += bytes([len(raw)]) + raw
    return bytes(out + b"\0")


def parse_query(data: bytes) -> Question:
    """A guest's query; DnsFormatError for anything else (a response, no question, two)."""
    if len(data) < HEADER_SIZE:
        raise DnsFormatError("shorter than a DNS header")
    if len(data) > MAX_QUERY:
        raise DnsFormatError(f"longer than {MAX_QUERY} bytes")
    ident, flags, qdcount, ancount, nscount, _ = HEADER.unpack_from(data)
    if flags & QR:
        raise DnsFormatError("a response, not a query")
    if qdcount != 1 or ancount or nscount:
        raise DnsFormatError("a query has exactly one question and no records")
    labels, end = _read_name(data, HEADER_SIZE, pointers=False)
    if end + _QUESTION_FIXED.size > len(data):
        raise DnsFormatError("the question has no type and class")
    qtype, qclass = _QUESTION_FIXED.unpack_from(data, end)
    wire = data[HEADER_SIZE : end + _QUESTION_FIXED.size]
    return Question(ident, flags, name_of(labels), qtype, qclass, wire)


def reply(question: Question, rcode: Rcode) -> bytes:
    """An answer with no records: the guest's id, opcode, RD and question, and ``rcode``."""
    flags = QR | (question.flags & (OPCODE | RD)) | RA | rcode
    return HEADER.pack(question.id, flags, 1, 0, 0, 0) + question.wire


def format_error(data: bytes) -> bytes | None:
    """FORMERR for a query whose question could not be read; None (drop it) when ``data``
    is not even a query header, or is a response (answering one could start a loop)."""
    if len(data) < HEADER_SIZE or len(data) > MAX_QUERY:
        return None
    ident, flags, *_ = HEADER.unpack_from(data)
    if flags & QR:
        return None
    return HEADER.pack(ident, QR | (flags & (OPCODE | RD)) | RA | Rcode.FORMERR, 0, 0, 0, 0)


def build_query(ident: int, name: str, qtype: int, qclass: int) -> bytes:
    """The resolver's own query to its upstream: recursion desired, no EDNS."""
    return (
        HEADER.pack(ident, RD, 1, 0, 0, 0) + encode_name(name) + _QUESTION_FIXED.pack(qtype, qclass)
    )


def parse_answer(
    data: bytes, ident: int, name: str, qtype: int, qclass: int, *, max_ttl: int
) -> Answer:
    """The upstream's answer to query ``ident`` for (name, qtype, qclass).

    TTLs above ``max_ttl`` (or with the top bit set, which RFC 2181 8 reads
    as 0) are rewritten, so that no guest keeps an address longer than the
    resolver keeps it open.  A truncated answer is returned without its
    records: the caller asks again over TCP.
    """
    if len(data) < HEADER_SIZE:
        raise DnsFormatError("shorter than a DNS header")
    got_id, flags, qdcount, ancount, nscount, arcount = HEADER.unpack_from(data)
    if got_id != ident or not flags & QR or flags & OPCODE or qdcount != 1:
        raise DnsFormatError("not the answer to this query")
    labels, end = _read_name(data, HEADER_SIZE, pointers=False)
    if end + _QUESTION_FIXED.size > len(data):
        raise DnsFormatError("the answer's question has no type and class")
    if name_of(labels) != name or _QUESTION_FIXED.unpack_from(data, end) != (qtype, qclass):
        raise DnsFormatError("the answer is for another question")
    position = end + _QUESTION_FIXED.size
    if flags & TC:
        return Answer(flags, (0, 0, 0), b"", {})
    body = bytearray(data)
    cnames: dict[str, str] = {}
    records: list[tuple[str, ipaddress.IPv4Address, int]] = []
    for index in range(ancount + nscount + arcount):
        owner, position = _read_name(data, position, pointers=True)
        if position + _RR_FIXED.size > len(data):
            raise DnsFormatError("a record runs past the end of the message")
        rtype, rclass, ttl, rdlength = _RR_FIXED.unpack_from(data, position)
        rdata = position + _RR_FIXED.size
        if rdata + rdlength > len(data):
            raise DnsFormatError("a record's data runs past the end of the message")
        if rtype != TYPE_OPT:  # OPT's "TTL" holds EDNS flags (RFC 6891 6.1.3)
            capped = min(ttl if ttl < 1 << 31 else 0, max_ttl)
            struct.pack_into("!I", body, position + 4, capped)
            ttl = capped
        if index < ancount and rclass == CLASS_IN:
            owner_name = name_of(owner)
            if owner_name is not None and rtype == TYPE_A and rdlength == 4:
                address = ipaddress.IPv4Address(data[rdata : rdata + 4])
                records.append((owner_name, address, ttl))
            elif owner_name is not None and rtype == TYPE_CNAME:
                target, target_end = _read_name(data, rdata, pointers=True)
                target_name = name_of(target)
                if target_end > rdata + rdlength:
                    raise DnsFormatError("a CNAME runs past its record")
                if target_name is not None:
                    cnames[owner_name] = target_name
        position = rdata + rdlength
    chain = {name}
    current = name
    for _ in range(len(cnames)):  # each CNAME followed once at most: a loop ends too
        if current not in cnames:
            break
        current = cnames[current]
        chain.add(current)
    addresses: dict[ipaddress.IPv4Address, int] = {}
    for owner_name, address, ttl in records:
        if owner_name in chain:
            addresses[address] = max(ttl, addresses.get(address, 0))
    return Answer(
        flags, (ancount, nscount, arcount), bytes(body[end + _QUESTION_FIXED.size :]), addresses
    )


def relay(question: Question, answer: Answer, *, limit: int | None) -> bytes:
    """The upstream's answer as the reply to the guest's query: the guest's id, RD and
    question (its own letter case), the upstream's records; truncated (TC, no records)
    if longer than ``limit`` bytes, so that the guest asks again over TCP."""
    flags = (answer.flags & ~(RD | TC)) | (question.flags & RD) | RA
    message = HEADER.pack(question.id, flags, 1, *answer.counts) + question.wire + answer.body
    if limit is not None and len(message) > limit:
        return HEADER.pack(question.id, flags | TC, 1, 0, 0, 0) + question.wire
    return message
