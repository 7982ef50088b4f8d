"""Inside a pre-started interpreter: wait for one job, then become that ``python3`` program.

A fresh ``python3`` costs the guest seconds (hundreds of system calls and page faults, each
paid to an emulated kernel); a template snapshot taken while this interpreter waits makes all
of that free for every sandbox restored from it. The agent (:mod:`ember.agent.pool`) starts::

    python3 -c BOOT FILES CTL GENERATION HEAP_BYTES ROLE PRELOAD...

with stdin ``/dev/null`` and stdout/stderr pipes. ``BOOT`` (:data:`ember.agent.member.BOOT`)
runs ``FILES`` (:mod:`~ember.agent.pybase`, :mod:`~ember.agent.pymain`,
:mod:`~ember.agent.pyjob`, :mod:`~ember.agent.pywarm`, :mod:`~ember.agent.pyclone` and this
one) in one private namespace and calls :func:`wait`, which imports the preload modules,
touches the heap, clones the holder, says ``ready`` on the ``CTL`` socket and blocks reading it
(``ROLE`` ``member``). A ``mother`` (``ROLE``) stops before the heap and forks members on
request instead (``pyclone._mother``).
The job (a ``marshal``-ed dict made by the agent from a :class:`ember.agent.pyargs.PyJob`, the
program's pipes attached) is applied (:class:`ember.agent.pyjob.Job`): descriptors, directory,
environment, ``sys.argv``/``sys.path``/``sys.flags``/``sys.executable``, standard streams, a new
``__main__``. ``BOOT`` itself runs the program with ``exec`` (or ``runpy`` for ``-m``), then
ends the way ``python3`` ends: ``SystemExit`` re-raised for the interpreter to handle, any other
uncaught exception printed by ``sys.excepthook`` (frames of ``BOOT`` and ``FILES`` cut) and
status 1, an uncaught ``KeyboardInterrupt`` as death by ``SIGINT``, normal finalisation
(threads joined, ``atexit``, buffers flushed) in every case.

Why these choices:

* These files import nothing at run time that ``python3`` start-up did not, except ``ctypes``,
  ``gc`` and ``_socket`` before the snapshot; the modules they added are dropped from
  ``sys.modules`` at hand-over, the preload modules (and all they imported) stay.
* The standard streams python3 made at start-up were made on the same kinds of files a
  program gets, so they serve it as they are; only ``-u``, ``PYTHONUNBUFFERED``,
  ``PYTHONIOENCODING`` or a stdin pipe make them again, as ``create_stdio`` in
  ``Python/pylifecycle.c`` (3.11) does.
* ``random`` (and ``numpy.random``, ``tempfile``'s name sequence) were seeded in the template,
  identically in every sibling: they are reseeded when the job's generation (the agent's count
  of restores and forks) is not the one this interpreter started in.
* Memory: ``PYTHONMALLOC=malloc`` and glibc's ``MALLOC_*`` variables (set by the agent) keep
  freed memory in the heap, and touching ``HEAP_BYTES`` before the snapshot means the
  program's allocations reuse pages the guest kernel has already mapped; ``gc.freeze()``
  keeps collections off the template's objects (a collection in a restored copy would write
  to all of their pages); the holder (see :mod:`ember.agent.pool`) makes the exit cheap.

What a program can still tell (each needs introspection, none changes results):

* one frame below its module frame (``File "<string>"``, ``BOOT``'s) in
  ``traceback.print_stack()``/``inspect.stack()``, and ``warnings.warn(stacklevel=N)`` past
  the top names it instead of ``sys:1``;
* ``hash()`` of str/bytes uses the secret this interpreter drew in the template, the same in
  every sibling (as in the run_code worker): it cannot be changed once strings exist.
  Programs that need their own set ``PYTHONHASHSEED`` (a real process runs them), or ask
  for ``"pool": false``;
* at exit, finalisers of objects in different modules of the program may run in another
  order than python3's (it depends on the collector's generations); each still runs, and
  unclosed files are still flushed;
* ``sys.getallocatedblocks()`` is 0 (glibc's allocator), ``gc.get_freeze_count()`` is not,
  and the process group holds the holder task besides the program.

Standard library only (it runs in the guest); called by the pool, never imported by the agent.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:  # no run-time import: these files must not add to sys.modules
    from typing import Any

if __name__ != "ember_pystart":  # imported as a module; in BOOT's namespace they are there
    from ember.agent.pybase import _Flags, _receive_job, _send
    from ember.agent.pyclone import _make_holder, _mother, _trim_heap
    from ember.agent.pyjob import Job
    from ember.agent.pywarm import (
        Ranges,
        _mother_ranges,
        _plan_rehearsal,
        _rehearse,
        _spare_bytes,
        _warm_forked,
        _warm_steps,
        warm_numpy,
    )


OOM_SCORE_ADJ = "/proc/self/oom_score_adj"
EXPENDABLE = b"1000"  # proc(5): the OOM killer's first choice, whatever its size
MOTHER = b"900"  # after the members: without her a refill is a new python3 (~20 s here)


def _expendable(score: bytes = EXPENDABLE) -> tuple[int, bytes]:
    """Make this waiting interpreter the guest OOM killer's first choice; the open file and
    the score it had (inherited from the agent, as a real ``python3``'s is), for
    :func:`_needed` (-1 if it could not be marked).

    The pool's interpreters hold most of a default guest's memory (their heaps), and the agent
    makes new ones when the sandbox is idle. When a program's allocations outgrow what is
    left, losing one of them costs a later exec a refill; losing the ``run_code`` worker or
    the program costs the user their work, and the OOM killer would pick them by size. The
    file is opened here, before the snapshot, so that a restored member's job pays one
    ``write``, not a path lookup too."""
    try:
        fd = os.open(OOM_SCORE_ADJ, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return -1, b""
    try:
        inherited = os.pread(fd, 16, 0).strip()
        os.write(fd, score)
    except OSError:
        os.close(fd)
        return -1, b""
    return fd, inherited


def _needed(adj: tuple[int, bytes]) -> None:
    """The job makes this interpreter a user's program: the OOM killer weighs it as a real
    ``python3`` again (the holder, sharing its memory, with it: proc(5)). The file is closed,
    so the program's descriptors are a fresh ``python3``'s."""
    fd, inherited = adj
    if fd < 0:
        return
    try:
        os.write(fd, inherited)
    except OSError:
        pass
    finally:
        os.close(fd)


def wait(argv: list[str], boot_globals: dict[str, Any], baseline: set[str]) -> Job:
    """Start-up work, ``ready``, then block until the agent hands over a job (BOOT calls this)."""
    ctl, generation, heap = (int(a) for a in argv[:3])
    mother = argv[3] == "mother"
    adj = _expendable(MOTHER if mother else EXPENDABLE)
    preload = argv[4:]
    before = set(sys.modules)
    error = ""
    for name in preload:
        try:
            __import__(name)
        except BaseException as exc:  # reported to the agent, which refuses the pool
            error = f"preloading {name!r} failed: {type(exc).__name__}: {exc}"
            break
    # What python3's own start-up imported, and the preload modules with all they imported,
    # stay; modules only these files needed are dropped at hand-over.
    if not error:
        warm_numpy()
    preloaded = set(sys.modules) - before
    keep = baseline | preloaded
    flags: _Flags | None = None
    try:
        flags = _Flags()
    except Exception:
        flags = None
    import gc  # built in; dropped from sys.modules again at hand-over

    # Everything start-up and the preload modules made is moved out of the collector's sight:
    # a collection in a restored copy would otherwise write to every one of those pages (a
    # host-side copy-on-write fault each, and private memory for the sandbox). Only
    # introspection (gc.get_objects, gc.get_freeze_count) can tell.
    gc.freeze()
    forked = warm_first = False
    profile = b""
    ranges: tuple[Ranges, Ranges] | None = None  # the mother's mappings (_profile_steps)
    if mother and not error:
        _trim_heap()
        # Read once, here in the template, for every member she forks (see _profile_steps).
        try:
            ranges = _mother_ranges()
        except (OSError, ValueError):
            pass  # ranges stay None: each member reads its own
        # Returns only in each interpreter this one forks: that carries on below as a member.
        ctl, heap, warm_first, profile = _mother(ctl)
        # The mother's file: this member marks its own. What a program gets back is what the
        # mother inherited from the agent (if she could not mark herself, it is what this reads).
        if adj[0] >= 0:
            os.close(adj[0])
        fd, inherited = _expendable()
        adj = (fd, adj[1] or inherited)
        generation = -1  # its generators are its mother's, as in every sibling: reseed
        forked = True
    if heap > 0 and not error:
        heap = min(heap, _spare_bytes())
        block = bytearray(heap)  # every page written once; freed into a heap that keeps it
        del block
    site = sys.modules.get("site")
    user_site = getattr(site, "USER_SITE", None) if site is not None else None
    # A member forked for the template takes its copy-on-write faults now, before ready
    # and so before the snapshot: every restored copy has them taken (a live refill takes
    # them after ready, in steps, and stops for a job: _warm_forked).
    warmed = 0
    if warm_first:
        try:
            warmed = sum(_warm_steps(keep, profile, ranges))
        except Exception:
            pass  # a warm-up only: the member serves its program unwarmed
    # Where a spare's rehearsal (the "warm" op below) reads and writes: found here, in the
    # template, rather than from /proc/self/maps (~0.9 s here) in every restored copy. A
    # member forked in a live sandbox finds it when first asked (spares are templates' copies).
    plan = None if error or (forked and not warm_first) else _plan_rehearsal(heap)
    alive: list[Any] = []
    holder = 0 if error else _make_holder(alive)
    state = {
        "generation": generation,
        "keep": keep,
        "encoding": sys.stdout.encoding if sys.stdout is not None else "utf-8",
        "errors": sys.stdout.errors if sys.stdout is not None else "strict",
    }
    _send(
        ctl,
        {
            "ready": not error,
            "error": error,
            "pid": os.getpid(),
            "holder": holder,
            "version": f"{sys.version_info[0]}.{sys.version_info[1]}",
            "user_site_in_path": bool(user_site and user_site in sys.path),
            "flags": bool(flags is not None and flags.works),
            "heap": heap,
            "warmed": warmed,  # pages the warm-up before ready went through (0: none)
            "preloaded": sorted(preloaded),  # what programs will find in sys.modules
        },
    )
    if error:
        os._exit(1)
    if forked and not warm_first:
        _warm_forked(ctl, keep, profile, ranges)
    while True:
        try:
            spec, fds = _receive_job(ctl)
        except (EOFError, OSError, ValueError):
            os._exit(0)  # the agent went away or is shutting the pool down
        if spec.get("op") != "warm":
            break
        if plan is None:
            plan = _plan_rehearsal(heap)
        _send(ctl, {"pages": _rehearse(heap, keep, plan)})
    if len(fds) not in (2, 3):
        os._exit(0)  # a job without its pipes: not from our agent
    _needed(adj)
    job = Job(spec, boot_globals)
    job.alive = alive
    job.apply((ctl, *fds), flags if flags and flags.works else None, state)
    return job
