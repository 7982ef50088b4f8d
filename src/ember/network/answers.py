"""The sandbox resolver's decisions: what each query of the guest gets, and what it opens.

For each query:

- a name the policy allows (:meth:`NetworkPolicy.resolves`) is asked of the
  upstream resolver (:mod:`ember.network.upstream`), and the answer's
  IPv4 addresses for that name are added to the sets of the name entries
  that allow it, for the answer's TTL (at least ``MIN_OPEN_S``), *before*
  the guest has the answer, so its first connection is not refused;
- any other name is answered NXDOMAIN; zone transfers and ANY, NOTIMP;
- a message that is not a query is dropped, a query that cannot be read
  gets FORMERR.

Replies over UDP are at most 512 bytes (no amplification), and an address
already open for long enough costs no ``nft`` run.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ipaddress
import logging
from collections import Counter
from collections.abc import Callable, Sequence

from ember.errors import SandboxError
from ember.network import dns
from ember.network.policy import NetworkPolicy
from ember.network.upstream import ask_upstream

log = logging.getLogger("ember.network.resolver")  # one logger for all of the resolver

MIN_OPEN_S = 60  # an address stays open at least this long: clients use answers a bit past TTL

# (set name, address, seconds): opens ``address`` in that set of the sandbox's table.
Element = tuple[str, ipaddress.IPv4Address, int]
SetWriter = Callable[[Sequence[Element]], None]


class Resolver:
    """The resolver's decisions for one sandbox: a guest's message in, the reply out.

    No sockets of the guest's here (the server around it has them), so it
    can be tested with bytes; upstream queries go out from the host.
    """

    def __init__(
        self,
        policy: NetworkPolicy,
        upstream: tuple[str, int] | None,
        write_sets: SetWriter,
        executor: concurrent.futures.Executor | None = None,
    ) -> None:
        self.policy = policy
        self.upstream = upstream
        self.write_sets = write_sets
        self.executor = executor
        self.stats: Counter[str] = Counter()
        self._open_until: dict[tuple[str, ipaddress.IPv4Address], float] = {}
        self._set_lock = asyncio.Lock()  # one nft run at a time per sandbox
        self._warned: set[str] = set()

    async def handle(self, data: bytes, *, tcp: bool) -> bytes | None:
        """The reply to ``data`` from the guest, or None to send nothing."""
        try:
            question = dns.parse_query(data)
        except dns.DnsFormatError:
            formerr = dns.format_error(data)
            self.stats["formerr" if formerr else "dropped"] += 1
            return formerr
        if question.opcode != 0:
            return self._refuse(question, dns.Rcode.NOTIMP)
        if question.name is None or not self.policy.resolves(question.name):
            return self._refuse(question, dns.Rcode.NXDOMAIN)
        if question.qclass != dns.CLASS_IN or question.qtype in dns.UNSERVED_TYPES:
            return self._refuse(question, dns.Rcode.NOTIMP)
        if self.upstream is None:
            return self._refuse(question, dns.Rcode.SERVFAIL)
        try:
            answer = await ask_upstream(self.upstream, question.name, question.qtype)
        except (OSError, TimeoutError, dns.DnsFormatError) as exc:
            self._log("upstream", "DNS upstream %s failed for %s: %s", self.upstream,
                      question.name, exc)  # fmt: skip
            return self._refuse(question, dns.Rcode.SERVFAIL)
        entries = self.policy.matching(question.name)
        if entries and answer.addresses and answer.rcode == dns.Rcode.NOERROR:
            try:
                await self._open({e.set_name for e in entries}, answer.addresses)
            except (OSError, SandboxError) as exc:
                self._log("nft", "could not open %s for %s: %s", list(answer.addresses),
                          question.name, exc)  # fmt: skip
                return self._refuse(question, dns.Rcode.SERVFAIL)
        self.stats["answered"] += 1
        return dns.relay(question, answer, limit=None if tcp else dns.MAX_UDP_REPLY)

    def _log(self, kind: str, message: str, *args: object) -> None:
        """A warning the first time, then debug: a guest must not flood the host's logs."""
        level = logging.DEBUG if kind in self._warned else logging.WARNING
        self._warned.add(kind)
        log.log(level, message, *args)

    def _refuse(self, question: dns.Question, rcode: dns.Rcode) -> bytes:
        self.stats[rcode.name.lower()] += 1
        return dns.reply(question, rcode)

    async def _open(self, sets: set[str], addresses: dict[ipaddress.IPv4Address, int]) -> None:
        """Open each address in each set for its TTL (at least MIN_OPEN_S), skipping those
        already open for at least half of that: a guest asking again costs no nft run."""
        loop = asyncio.get_running_loop()
        async with self._set_lock:
            now = loop.time()
            wanted: list[Element] = []
            for set_name in sorted(sets):
                for address, ttl in addresses.items():
                    seconds = max(MIN_OPEN_S, ttl)
                    if self._open_until.get((set_name, address), 0.0) - now >= seconds / 2:
                        continue
                    wanted.append((set_name, address, seconds))
            if not wanted:
                return
            await loop.run_in_executor(self.executor, self.write_sets, wanted)
            self.stats["nft"] += 1
            for set_name, address, seconds in wanted:
                self._open_until[(set_name, address)] = now + seconds
            if len(self._open_until) > 4 * len(wanted) + 1024:  # forget what has expired
                self._open_until = {k: t for k, t in self._open_until.items() if t > now}
