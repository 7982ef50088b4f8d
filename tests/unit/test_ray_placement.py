"""``ember.ray``'s placement policy on its own: no Ray cluster, no KVM."""

from __future__ import annotations

import pytest

from ember.ray.placement import Capacity, NodeInfo, mem_available_mib, rank


def test_spread_pack_and_limits() -> None:
    def cap(name: str, live: int, free: int, limit: int | None = None) -> Capacity:
        node = NodeInfo(name, f"ember-node-{name}", "http://x", "t", 2)
        return Capacity(node, free, live, 0, 0, limit, 256)

    caps = [cap("a", 3, 4000), cap("b", 1, 2000), cap("c", 1, 3000), cap("d", 0, 300)]
    assert [c.node.node_id for c in rank(caps, 512, "spread")] == ["c", "b", "a"]
    assert [c.node.node_id for c in rank(caps, 512, "pack")] == ["a", "b", "c"]
    assert rank([cap("a", 2, 9000, limit=2)], 512) == []
    with pytest.raises(ValueError):
        rank(caps, 512, "random")  # type: ignore[arg-type]
    assert mem_available_mib("MemTotal: 100 kB\nMemAvailable:   2097152 kB\n") == 2048


def test_nodes_with_the_template_come_first() -> None:
    def cap(name: str, live: int, templates: tuple[str, ...]) -> Capacity:
        node = NodeInfo(name, f"ember-node-{name}", "http://x", "t", 2)
        return Capacity(node, 8000, live, 0, 0, 4, 256, templates)

    caps = [
        cap("a", 0, ()),
        cap("b", 2, ("sci",)),
        cap("c", 1, ("sci", "web")),
        cap("d", 4, ("sci",)),
    ]
    # d is full: having the template does not make room
    assert [c.node.node_id for c in rank(caps, 512, "spread", "sci")] == ["c", "b", "a"]
    assert [c.node.node_id for c in rank(caps, 512, "pack", "sci")] == ["b", "c", "a"]
    assert [c.node.node_id for c in rank(caps, 512, "spread", "web")] == ["c", "a", "b"]
    assert [c.node.node_id for c in rank(caps, 512, "spread")] == ["a", "c", "b"]
