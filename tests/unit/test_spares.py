"""The spare pool's rules, with fake sandboxes (no KVM): what is handed out, refilled,
closed, and when the refill thread holds back. The real thing is in
tests/integration/test_spares.py."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field

import pytest

from ember.sandbox import spare_pool as spares
from ember.sandbox.spare_pool import MAX_AUTO_KEYS, Spare, SparePool
from tests.waiting import wait_for


@dataclass
class Fake:
    key: Hashable
    number: int
    alive: bool = True
    current: bool = True
    closed: bool = False


@dataclass
class Maker:
    """``make`` for the pool: numbered fakes, a log of calls, failures on request."""

    made: list[Fake] = field(default_factory=list)
    fail: bool = False
    calls: int = 0
    gate: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.gate.set()

    def __call__(self, key: Hashable) -> Spare[Fake]:
        self.calls += 1
        self.gate.wait(10)
        if self.fail:
            raise RuntimeError("restore failed")
        fake = Fake(key, len(self.made))
        self.made.append(fake)

        def close() -> None:
            fake.closed = True

        return Spare(fake, lambda: fake.alive, close, lambda: fake.current)


@pytest.fixture
def pool_of() -> Iterator[Callable[..., tuple[SparePool[Fake], Maker]]]:
    pools: list[SparePool[Fake]] = []

    def make(auto: int = 0) -> tuple[SparePool[Fake], Maker]:
        maker = Maker()
        pool = SparePool(maker, auto=auto)
        pools.append(pool)
        return pool, maker

    yield make
    for pool in pools:
        pool.shutdown()


def test_nothing_is_made_or_handed_out_unless_asked(pool_of: Callable[..., tuple]) -> None:
    pool, maker = pool_of()
    assert pool.take("a") is None
    time.sleep(0.1)
    assert maker.calls == 0


def test_keep_makes_spares_and_a_take_hands_each_out_once_then_refills(
    pool_of: Callable[..., tuple],
) -> None:
    pool, maker = pool_of()
    pool.keep("a", 2)
    assert pool.wait_ready("a", 2, 5)
    first, second = pool.take("a"), pool.take("a")
    assert first is not None and second is not None and first is not second
    assert {first.number, second.number} == {0, 1}
    assert pool.taken == 2
    assert pool.wait_ready("a", 2, 5)  # refilled with new ones, never the taken ones
    assert {f.number for f in maker.made} == {0, 1, 2, 3}
    assert pool.take("b") is None  # another option set has none


def test_a_dead_spare_is_closed_and_skipped(pool_of: Callable[..., tuple]) -> None:
    pool, maker = pool_of()
    pool.keep("a", 1)
    assert pool.wait_ready("a", 1, 5)
    maker.made[0].alive = False
    assert pool.take("a") is None
    assert maker.made[0].closed
    assert pool.wait_ready("a", 1, 5)
    taken = pool.take("a")
    assert taken is not None and taken.number == 1 and not taken.closed


def test_a_spare_no_longer_current_is_retired_while_it_waits(
    pool_of: Callable[..., tuple], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(spares, "SWEEP_S", 0.05)
    pool, maker = pool_of()
    pool.keep("a", 1)
    assert pool.wait_ready("a", 1, 5)
    maker.made[0].current = False  # its template is no longer what a new one would be
    wait_for(lambda: maker.made[0].closed, 5, "the sweep to close it")
    assert pool.wait_ready("a", 1, 5)  # replaced, with no take asking
    taken = pool.take("a")
    assert taken is not None and taken.number == 1


def test_keep_zero_closes_the_waiting_spares(pool_of: Callable[..., tuple]) -> None:
    pool, maker = pool_of()
    pool.keep("a", 2)
    assert pool.wait_ready("a", 2, 5)
    pool.keep("a", 0)
    assert all(f.closed for f in maker.made)  # closed before keep returned
    assert pool.take("a") is None
    with pytest.raises(ValueError):
        pool.keep("a", spares.MAX_SPARES + 1)


def test_a_lower_count_closes_the_extra_spares(pool_of: Callable[..., tuple]) -> None:
    pool, maker = pool_of()
    pool.keep("a", 2)
    assert pool.wait_ready("a", 2, 5)
    pool.keep("a", 1)
    assert pool.ready("a") == 1
    assert [f.closed for f in maker.made] == [False, True]  # the newest went first


def test_a_failing_refill_backs_off_instead_of_spinning(pool_of: Callable[..., tuple]) -> None:
    pool, maker = pool_of()
    maker.fail = True
    pool.keep("a", 1)
    wait_for(lambda: maker.calls >= 1, 5, "a refill tried")
    time.sleep(0.5)
    assert maker.calls == 1  # the next try waits BACKOFF_S
    maker.fail = False
    pool.keep("a", 1)  # asking again clears the back-off
    assert pool.wait_ready("a", 1, 5)


def test_refills_wait_while_a_sandbox_is_made_on_demand(pool_of: Callable[..., tuple]) -> None:
    pool, maker = pool_of()
    with pool.starting():
        pool.keep("a", 1)
        time.sleep(0.3)
        assert maker.calls == 0
    assert pool.wait_ready("a", 1, 5)


def test_a_refill_starts_only_a_while_after_the_last_take(
    pool_of: Callable[..., tuple], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(spares, "AFTER_TAKE_S", 0.6)
    pool, maker = pool_of()
    pool.keep("a", 1)
    assert pool.wait_ready("a", 1, 5)
    assert pool.take("a") is not None
    time.sleep(0.3)
    assert maker.calls == 1  # the taker's first calls go first
    assert pool.wait_ready("a", 1, 5)


def test_auto_keeps_spares_for_the_option_sets_used_last(pool_of: Callable[..., tuple]) -> None:
    pool, maker = pool_of(auto=1)
    assert pool.take("k0") is None  # first use: none yet, one is made for next time
    assert pool.wait_ready("k0", 1, 5)
    assert pool.take("k0") is not None
    for n in range(1, MAX_AUTO_KEYS + 1):  # k0 becomes the least recently used and is dropped
        pool.take(f"k{n}")
        assert pool.wait_ready(f"k{n}", 1, 5)
    k0_spares = [f for f in maker.made if f.key == "k0"]
    wait_for(lambda: all(f.closed for f in k0_spares if f.number != 0), 5, "k0 spares closed")
    assert pool.ready("k0") == 0


def test_shutdown_closes_what_waits_and_what_is_being_made(pool_of: Callable[..., tuple]) -> None:
    pool, maker = pool_of()
    pool.keep("a", 1)
    assert pool.wait_ready("a", 1, 5)
    maker.gate.clear()  # the refill after this take blocks inside make
    pool.keep("a", 2)
    wait_for(lambda: maker.calls == 2, 5, "the second refill started")
    closer = threading.Thread(target=pool.shutdown)
    closer.start()
    wait_for(lambda: maker.made[0].closed, 5, "the waiting spare closed")
    maker.gate.set()
    closer.join(10)
    assert all(f.closed for f in maker.made)  # the one made during shutdown too
    assert pool.take("a") is None


def test_a_forked_child_forgets_the_parents_spares(pool_of: Callable[..., tuple]) -> None:
    pool, maker = pool_of()
    pool.keep("a", 1)
    assert pool.wait_ready("a", 1, 5)
    pool.forget()  # what register()'s at-fork hook runs in the child
    assert pool.take("a") is None
    assert not maker.made[0].closed  # untouched: it is the parent's


def test_auto_count_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for text, count in [("", 0), ("2", 2), ("-1", 0), ("x", 0), ("999", spares.MAX_SPARES)]:
        monkeypatch.setenv(spares.SIZE_ENV, text)
        assert spares.auto_count() == count
