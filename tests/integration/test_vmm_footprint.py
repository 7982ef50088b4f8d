"""A restored VMM shares the zygote's heap instead of copying it (issue 17).

Each VMM is a fork of the pre-imported zygote; a full garbage collection in the child would
write the GC header of every object the zygote imported and so copy the pages that hold them
into every sandbox. The zygote freezes the GC before forking and the child keeps it frozen.
"""

from __future__ import annotations

from ember import Sandbox

from .conftest import Images

# The zygote has imported the whole VMM (ember.vmm.process, devices, jail, seccomp): tens of
# thousands of tracked objects. A child that unfroze them would report 0.
MIN_FROZEN = 10_000


def test_a_restored_vmm_keeps_the_zygote_heap_frozen_after_requests(images: Images) -> None:
    with Sandbox() as sb:
        for _ in range(3):
            sb.ping()
        assert sb.run_code("6*7").value == "42"
        status = sb._vmm.control("status")
    assert status["gc_frozen"] >= MIN_FROZEN, status
    assert len(status["gc_collections"]) == 3
