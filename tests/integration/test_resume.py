"""Siblings restored from one template do not share its secrets (issue 14 item 16).

Every sandbox restored from a template starts from the same memory: the guest kernel's CRNG
state and the warm interpreter's ``random`` state are the template's. The host's first request
to each new VMM carries fresh entropy and its clock (``resume``), and the agent applies them
before it serves that request. What cannot be changed is documented: a running interpreter's
``hash()`` secret, here the warm ``run_code`` worker's.
"""

from __future__ import annotations

import ast

from ember import Sandbox

from .conftest import Images

DRAW = "import os, random, numpy\n(os.urandom(32).hex(), random.random(), numpy.random.rand())"


def test_the_resume_is_applied_before_the_first_request_is_served(images: Images) -> None:
    with Sandbox() as sb:
        resume = sb.ping()["resume"]  # the ping is the first request: it carried the resume
        assert resume["reseeds"] >= 1 and resume["entropy_bytes"] >= 32, resume
        assert resume["rekeys"] == resume["reseeds"], resume  # Ember's kernel: in one step
        assert resume["last_error"] == ""
        generation = resume["generation"]
        with sb.fork() as child:
            assert child.ping()["resume"]["generation"] == generation + 1


def test_siblings_draw_different_random_numbers(images: Images) -> None:
    """``random`` and numpy's global generator in the warm run_code worker (numpy is imported
    there in the template), and the kernel's CRNG: reseeded whether the resume came on the
    code ring (the first call is a run_code: the worker seeds from its entropy) or over vsock
    (a ping first: the agent applies it, the worker asks the kernel)."""
    draws = []
    for ping_first in (False, True):
        with Sandbox() as sb:
            if ping_first:
                sb.ping()
            result = sb.run_code(DRAW, timeout=120)
            assert result.error is None, result.error
            draws.append(ast.literal_eval(result.value or ""))
            with sb.fork() as child:
                result = child.run_code(DRAW, timeout=120)
                assert result.error is None, result.error
                draws.append(ast.literal_eval(result.value or ""))
    for column in range(3):
        assert len({d[column] for d in draws}) == len(draws), draws
