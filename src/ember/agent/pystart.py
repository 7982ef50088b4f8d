"""Inside a pre-started interpreter: wait for one job, then become that ``python3`` program.

A fresh ``python3`` costs the guest seconds (hundreds of system calls and page faults, each
paid to an emulated kernel); a template snapshot taken while this interpreter waits makes all
of that free for every sandbox restored from it. The agent (:mod:`ember.agent.pool`) starts::

    python3 -c BOOT PYSTART CTL GENERATION HEAP_BYTES ROLE PRELOAD...

with stdin ``/dev/null`` and stdout/stderr pipes. ``BOOT`` (:data:`ember.agent.pool.BOOT`) runs
this file in a private namespace and calls :func:`wait`, which imports the preload modules,
touches the heap, clones the holder, says ``ready`` on the ``CTL`` socket and blocks reading
it (``ROLE`` ``member``). A ``mother`` (``ROLE``) stops before the heap and forks members on request
instead (:func:`_mother`). The job (a ``marshal``-ed dict made by the agent from a
:class:`ember.agent.pyargs.PyJob`, the program's pipes attached) is applied here — descriptors,
directory, environment, ``sys.argv``/``sys.path``/``sys.flags``/``sys.executable``, standard
streams, a new ``__main__`` — and ``BOOT`` itself runs the program with ``exec`` (or ``runpy`` for
``-m``), then ends the way ``python3`` ends: ``SystemExit`` re-raised for the interpreter to handle,
any other uncaught exception printed by ``sys.excepthook`` (frames of ``BOOT`` and this file cut)
and status 1, an uncaught ``KeyboardInterrupt`` as death by ``SIGINT``, normal finalisation (threads
joined, ``atexit``, buffers flushed) in every case.

Why these choices:

* This file imports nothing at run time that ``python3`` start-up did not, except ``ctypes``,
  ``gc`` and ``_socket`` before the snapshot; the modules it added are dropped from
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

import _weakref
import marshal
import os
import sys

_sys: Any = sys  # for the attributes typeshed calls final or does not know

TYPE_CHECKING = False
if TYPE_CHECKING:  # no run-time import: this file must not add to sys.modules
    from collections.abc import Iterator
    from typing import Any

HOLDER_STACK = 64 << 10
RESERVE_MIB = 96  # ember.agent.heap.RESERVE_MIB (this file imports nothing of Ember's)
CLONE_VM = 0x100
CLONE_PARENT = 0x8000
SIGCHLD = 17
SYS_PAUSE = 34  # x86_64
BACKGROUND_NICE = 19
SYS_CLONE = 56
SYS_GETTID = 186
CLONE_CHILD_SETTID = 0x01000000
TID_OFFSET = 0x2D0  # of ``tid`` in glibc's struct pthread, x86_64 (checked: _Forker)
STEP_PAGES = 64  # of a forked member's warm-up between two looks for a job (~0.2 s here)
REHEARSED_HEAP = 2 << 20  # of the pre-faulted block, what a rehearsal writes (see _rehearse)
MAX_BSS = 4 << 20  # an unnamed mapping after a library's data bigger than this is not its .bss
_ZIP_END = b"PK\x05\x06"


def _read_exact(fd: int, size: int) -> bytes:
    parts = []
    while size:
        chunk = os.read(fd, size)
        if not chunk:
            raise EOFError
        parts.append(chunk)
        size -= len(chunk)
    return b"".join(parts)


def _send(fd: int, message: dict[str, Any]) -> None:
    data = marshal.dumps(message)
    data = len(data).to_bytes(4, "big") + data
    while data:
        data = data[os.write(fd, data) :]


def _receive(fd: int) -> dict[str, Any]:
    size = int.from_bytes(_read_exact(fd, 4), "big")
    message = marshal.loads(_read_exact(fd, size))
    if not isinstance(message, dict):
        raise EOFError
    return message


class _Flags:
    """Writes ``sys.flags`` fields (a read-only struct sequence, stored like a tuple)."""

    def __init__(self) -> None:
        import ctypes

        self._ctypes = ctypes
        self._names = type(sys.flags).__match_args__
        self.works = self._check()

    def _slot(self, index: int) -> Any:
        address = (
            id(sys.flags) + tuple.__basicsize__ + index * self._ctypes.sizeof(self._ctypes.c_void_p)
        )
        return self._ctypes.c_void_p.from_address(address)

    def _check(self) -> bool:
        """Writing a field's own value back must read back the same object (else: no patching,
        and jobs that need a field changed go to real processes)."""
        try:
            index = self._names.index("quiet")
            value = sys.flags[index]
            self._write(index, value)
            return sys.flags.quiet is value and len(sys.flags) == len(self._names)
        except Exception:
            return False

    def _write(self, index: int, value: object) -> None:
        self._ctypes.pythonapi.Py_IncRef(self._ctypes.py_object(value))
        self._slot(index).value = id(value)
        # the old value (0, 1, False, True) is a shared constant: one reference is kept

    def set(self, values: dict[str, Any]) -> None:
        for name, value in values.items():
            index = self._names.index(name)
            old = sys.flags[index]
            if old != value or type(old) is not type(value):
                self._write(index, value)


def _reseed() -> None:
    """Draws made by user-space generators seeded in the template differ in every sibling."""
    random = sys.modules.get("random")
    if random is not None:
        # 32 bytes, not random.seed()'s 2,496: each 64 bytes of os.urandom is a ChaCha block
        # of emulated kernel code here (~0.6 ms); 256 bits seed a non-crypto generator plenty.
        random.seed(os.urandom(32))
    numpy_random = sys.modules.get("numpy.random")
    if numpy_random is not None:
        try:
            numpy_random.seed()
        except Exception:
            pass
    tempfile: Any = sys.modules.get("tempfile")
    if tempfile is not None:
        tempfile._name_sequence = None


def _stdio(fd: int, write: bool, name: str, encoding: str, errors: str, unbuffered: bool) -> Any:
    """One standard stream as ``create_stdio`` in ``Python/pylifecycle.c`` (3.11) makes it."""
    import io

    buffering = 0 if (unbuffered and write) else -1
    buf: Any = io.open(fd, "wb" if write else "rb", buffering, None, None, None, False)  # noqa: SIM115, UP020
    raw = buf if buffering == 0 else buf.raw
    raw.name = name
    line_buffering = not unbuffered and (raw.isatty() or fd == 2)
    stream: Any = io.TextIOWrapper(buf, encoding, errors, "\n", line_buffering, unbuffered)
    stream.mode = "w" if write else "r"
    return stream


def _io_encoding(spec: str | None, encoding: str, errors: str) -> tuple[str, str]:
    """``PYTHONIOENCODING=enc[:errors]`` as ``config_init_stdio_encoding`` reads it."""
    if not spec:
        return encoding, errors
    import codecs  # imported by python3's start-up already

    enc, _, errs = spec.partition(":")
    if enc:
        encoding = codecs.lookup(enc).name
        if not errs:
            errs = "strict"
    if errs:
        errors = errs
    return encoding, errors


def _getimporter(path: str) -> Any:
    """``PyImport_GetImporter``: a directory or zip file is run as its ``__main__`` module."""
    cache = sys.path_importer_cache
    if path in cache:
        return cache[path]
    cache[path] = None  # as CPython caches it: a plain file has no importer
    for hook in sys.path_hooks:
        try:
            importer = hook(path)
        except ImportError:
            continue
        cache[path] = importer
        return importer
    return None


class Job:
    """One program; ``BOOT`` calls ``call(*args)``, then :meth:`finish` or :meth:`uncaught`."""

    def __init__(self, spec: dict[str, Any], boot_globals: dict[str, Any]) -> None:
        self.spec = spec
        self.boot_globals = boot_globals
        self.call: Any = None
        self.args: tuple[Any, ...] = ()
        self.main: dict[str, Any] = {}
        self.set_file_name = False
        self.sigint = False
        self.alive: list[Any] = []  # the holder's stack
        self.baseline: set[str] = set()
        self.script: tuple[bytes | None, OSError | None, str | None, bool] = (
            None,
            None,
            None,
            False,
        )

    # -- what BOOT calls ---------------------------------------------------------------

    def finish(self) -> None:
        """After the program (or its SystemExit): as ``_PyRun_SimpleFileObject`` ends."""
        if self.set_file_name:
            self.main.pop("__file__", None)
            self.main.pop("__cached__", None)
        for stream in (sys.stderr, sys.stdout):
            try:
                if stream is not None:
                    stream.flush()
            except Exception:
                pass

    def uncaught(self, exc: BaseException) -> None:
        """``PyErr_Print`` for an exception the program did not catch; then status 1."""
        self.finish()
        tb = _strip(exc.__traceback__, self.boot_globals)
        exc.__traceback__ = tb
        sys.last_type, sys.last_value, sys.last_traceback = type(exc), exc, tb
        if isinstance(exc, KeyboardInterrupt):
            self.sigint = True  # python3 dies by SIGINT after finalising: see _exit_by_sigint
        hook = getattr(sys, "excepthook", None)
        sys.audit("sys.excepthook", hook, type(exc), exc, tb)
        if hook is None:
            sys.stderr.write("sys.excepthook is missing\n")
            sys.__excepthook__(type(exc), exc, tb)
        else:
            try:
                hook(type(exc), exc, tb)
            except SystemExit:
                raise
            except BaseException as hook_exc:
                hook_tb = _strip(hook_exc.__traceback__, self.boot_globals)
                hook_exc.__traceback__ = hook_tb  # what the display prints
                sys.stderr.write("Error in sys.excepthook:\n")
                sys.__excepthook__(type(hook_exc), hook_exc, hook_tb)
                sys.stderr.write("\nOriginal exception was:\n")
                sys.__excepthook__(type(exc), exc, tb)
        raise SystemExit(1)

    def end(self, exc: BaseException | None) -> None:
        """End as ``Py_FinalizeEx`` would, but leave the template's modules standing.

        python3's finalisation tears down every module, numpy's included: ~0.5 s here, as each
        page of the template's objects it writes is a copy-on-write fault, and private memory
        for the sandbox. What a program can see of it is done here, in python3's order:
        threads joined, ``atexit``, standard streams flushed, then the program's own modules
        (``__main__`` and what it imported) cleared as ``finalize_modules`` clears them, so
        its objects' ``__del__`` run and its unclosed files are flushed; then ``os._exit``.
        Whenever that could differ from python3 (an exit code that is not an int, death by
        SIGINT, threads still running, a stream that cannot be flushed) this returns and the
        real finalisation runs, as it did before.
        """
        code = None if exc is None else getattr(exc, "code", None)
        if code is None:
            status = 0
        elif type(code) is int and -(1 << 31) <= code < (1 << 31):
            status = code
        else:
            return  # printed by the interpreter, status 1 (or an overflow it reports)
        if self.sigint:
            return
        threading: Any = sys.modules.get("threading")
        try:
            if threading is not None:
                threading._shutdown()  # wait_for_thread_shutdown
        except BaseException:
            return
        import atexit

        atexit._run_exitfuncs()  # and forgets them: a real finalisation would not run them again
        if len(sys._current_frames()) > 1 or not _flush_std():
            return  # daemon threads are stopped, and flush errors reported, by python3 itself
        if exc is not None:
            exc.__traceback__ = None  # its frames hold the program's globals
        self._clear_program_modules()
        if not _flush_std(report=True):
            status = 120  # as Py_Exit after a failed flush
        os._exit(status)

    def _clear_program_modules(self) -> None:
        """``finalize_modules`` for the modules the program brought (the template's stay)."""
        import gc

        collect = gc.collect  # gc itself may be cleared below (the program imported it too)
        for name in ("last_type", "last_value", "last_traceback"):
            setattr(sys, name, None)
        for name in ("stdin", "stdout", "stderr"):
            setattr(sys, name, getattr(sys, f"__{name}__"))
        collect()  # python3 collects once before it touches a module
        names = [n for n in sys.modules if n == "__main__" or n not in self.baseline]
        kept: list[Any] = []
        for name in names:  # finalize_remove_modules, in sys.modules order
            module = sys.modules.pop(name, None)
            try:
                kept.append(_weakref.ref(module))
            except TypeError:
                kept.append(lambda module=module: module)
        module = None
        self.main, self.call, self.args = {}, None, ()
        collect()  # what nothing else references goes now, as in python3
        for ref in reversed(kept):  # finalize_modules_clear_weaklist: reverse import order
            namespace = getattr(ref(), "__dict__", None)
            if isinstance(namespace, dict):
                _clear_module_dict(namespace)
        collect()

    def _exit_by_sigint(self) -> None:
        if self.sigint:
            import signal

            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except Exception:
                    pass
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)

    # -- becoming the program ------------------------------------------------------------

    def apply(self, fds: tuple[int, ...], flags: _Flags | None, state: dict[str, Any]) -> None:
        spec = self.spec
        stdout_w, stderr_w = fds[1], fds[2]
        import atexit  # a built-in module; registering is all that is needed of it

        # Modules only this file needed go; any the steps below import (a codec for
        # PYTHONIOENCODING, runpy for -m) stay, as python3 imports them too.
        drop = set(sys.modules) - state["keep"]
        cwd = spec.get("cwd")
        if cwd:
            os.chdir(cwd)
        if spec.get("stdin"):
            os.dup2(fds[3], 0)
        os.dup2(stdout_w, 1)
        os.dup2(stderr_w, 2)
        for fd in fds:
            os.close(fd)
        old_tz = os.environ.get("TZ")
        os.environ.clear()
        os.environ.update(spec["env"])
        if os.environ.get("TZ") != old_tz and "time" in sys.modules:
            sys.modules["time"].tzset()
        sys.argv = list(spec["argv"])
        sys.orig_argv = list(spec["orig_argv"])
        sys.executable = _sys._base_executable = spec["executable"]
        if spec["flags"] and flags is not None:
            flags.set(spec["flags"])
        if spec["flags"].get("dont_write_bytecode"):
            sys.dont_write_bytecode = True
        self._site(spec)
        self._path(spec)
        # The streams python3 made at start-up were made on the same kinds of files (stdin
        # /dev/null, stdout and stderr pipes): they stay, unless the job asks for other ones.
        unbuffered = bool(spec["unbuffered"])
        encoding, errors = _io_encoding(spec.get("io_encoding"), state["encoding"], state["errors"])
        if unbuffered or spec.get("io_encoding"):
            sys.stdout = _sys.__stdout__ = _stdio(1, True, "<stdout>", encoding, errors, unbuffered)
            sys.stderr = _sys.__stderr__ = _stdio(
                2, True, "<stderr>", encoding, "backslashreplace", unbuffered
            )
        if unbuffered or spec.get("io_encoding") or spec.get("stdin"):  # a pipe, not /dev/null
            sys.stdin = _sys.__stdin__ = _stdio(0, False, "<stdin>", encoding, errors, unbuffered)
        if spec.get("generation") != state["generation"]:
            _reseed()
        atexit.register(self._exit_by_sigint)  # first registered, so it runs last
        for name in drop:
            sys.modules.pop(name, None)
        self.baseline = set(sys.modules)  # what the program found: not its to tear down
        self._prepare_main(spec)

    def _site(self, spec: dict[str, Any]) -> None:
        """``site.main`` computes the user's site directory whatever ``-s`` says."""
        site: Any = sys.modules.get("site")
        if site is None:
            return
        site.USER_BASE = site.USER_SITE = None
        site.getusersitepackages()  # from the job's HOME / PYTHONUSERBASE
        if spec["no_user_site"]:
            site.ENABLE_USER_SITE = False

    def _path(self, spec: dict[str, Any]) -> None:
        if sys.path and sys.path[0] == "":
            del sys.path[0]  # BOOT's own "-c" entry
        extra = [os.path.abspath(p) for p in spec["pythonpath"]]
        sys.path[0:0] = extra
        mode, target = spec["mode"], spec["target"]
        if mode == "file":
            path = _abspath(target)
            self.script = _read_script(path)
            source, _, real, is_dir = self.script
            # As pymain_run_python: a directory or zip file runs as its __main__ module. Only
            # a file holding a zip end-of-directory record can be a zip: skip the hooks' I/O
            # (each system call is a few ms here) when it holds none.
            if is_dir or (source is not None and _ZIP_END in source[-(1 << 16) - 22 :]):
                importer = _getimporter(path)
            else:
                importer = sys.path_importer_cache.setdefault(path, None)
            if importer is not None:
                sys.path.insert(0, path)
                self._importer_main = True
                return
            if not spec["safe_path"]:
                sys.path.insert(0, os.path.dirname(real or path))
        elif not spec["safe_path"]:
            sys.path.insert(0, os.getcwd() if mode == "module" else "")

    def _prepare_main(self, spec: dict[str, Any]) -> None:
        import builtins

        bootstrap = sys.modules["_frozen_importlib"]
        module = type(sys)("__main__")
        main = module.__dict__
        main["__annotations__"] = {}
        main["__builtins__"] = builtins
        main["__loader__"] = bootstrap.BuiltinImporter
        sys.modules["__main__"] = module
        self.main = main
        mode, target = spec["mode"], spec["target"]
        if mode == "module" or getattr(self, "_importer_main", False):
            import runpy

            runpy_any: Any = runpy
            self.call = runpy_any._run_module_as_main  # what python3 -m calls
            self.args = (target, True) if mode == "module" else ("__main__", False)
            return
        if mode == "command":
            source: str | bytes = target
            filename = "<string>"
        elif mode == "stdin":
            source = _read_all(0)
            filename = "<stdin>"
            main["__file__"], main["__cached__"] = filename, None
            self.set_file_name = True
        else:
            filename = _abspath(target)
            data, error, _, _ = self.script
            if data is None:
                assert error is not None
                self.call, self.args = _cannot_open, (spec["orig_argv"][0], filename, error)
                return
            source = data
            main["__file__"], main["__cached__"] = filename, None
            self.set_file_name = True
            external = sys.modules["_frozen_importlib_external"]
            main["__loader__"] = external.SourceFileLoader("__main__", filename)
        try:
            code = compile(source, filename, "exec", dont_inherit=True)
        except BaseException as exc:  # SyntaxError, ValueError (null bytes), MemoryError
            self.call, self.args = _reraise, (exc,)
            return
        self.call, self.args = exec, (code, main)


def _read_script(path: str) -> tuple[bytes | None, OSError | None, str | None, bool]:
    """(source, open error, real path, is a directory) in as few system calls as possible."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        return None, exc, None, False
    try:
        import stat  # imported by python3's start-up already

        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            return None, None, None, True
        parts = [os.read(fd, info.st_size + 1)]
        while len(parts[-1]) > 0 and (len(parts) > 1 or len(parts[0]) > info.st_size):
            parts.append(os.read(fd, 1 << 16))
        try:  # the kernel resolved every symlink already: one call, not an lstat per component
            real = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            real = os.path.realpath(path)
        return b"".join(parts), None, real, False
    except OSError as exc:
        return None, exc, None, False
    finally:
        os.close(fd)


def _abspath(path: str) -> str:
    """``_Py_abspath``: the directory joined on, not normalised (``/tmp/./x.py`` stays)."""
    if os.path.isabs(path):
        return path
    return os.path.join(os.getcwd(), path)


def _read_all(fd: int) -> bytes:
    parts = []
    while chunk := os.read(fd, 1 << 16):
        parts.append(chunk)
    return b"".join(parts)


def _cannot_open(program: str, filename: str, exc: OSError) -> None:
    sys.stderr.write(
        f"{program}: can't open file {filename!r}: [Errno {exc.errno}] {exc.strerror}\n"
    )
    raise SystemExit(2)


def _flush_std(report: bool = False) -> bool:
    """``flush_std_files``: False if a stream would not flush (reported if ``report``)."""
    ok = True
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None and not stream.closed:
                stream.flush()
        except Exception as exc:
            ok = False
            if report and stream is sys.stdout:
                try:  # PyErr_WriteUnraisable's default output for an error without frames
                    sys.stderr.write(
                        f"Exception ignored in: {stream!r}\n{type(exc).__name__}: {exc}\n"
                    )
                    sys.stderr.flush()
                except Exception:
                    pass
    return ok


def _clear_module_dict(namespace: dict[str, Any]) -> None:
    """``_PyModule_ClearDict``: names with one leading underscore first, then all but
    ``__builtins__``, each set to None (not deleted), so ``__del__`` methods still find them."""
    for key, value in list(namespace.items()):
        if value is not None and isinstance(key, str) and key[:1] == "_" and key[1:2] != "_":
            namespace[key] = None
    for key, value in list(namespace.items()):
        if value is not None and isinstance(key, str) and key != "__builtins__":
            namespace[key] = None


def _reraise(exc: BaseException) -> None:
    raise exc.with_traceback(None)


def _strip(tb: Any, boot_globals: dict[str, Any]) -> Any:
    """Drop the leading frames of BOOT and of this file: tracebacks start at the program."""
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_globals is boot_globals or frame.f_globals is globals():
            tb = tb.tb_next
        else:
            break
    return tb


def warm_numpy() -> None:
    """If numpy was preloaded, run its common kernels once on tiny inputs: the first call of a
    LAPACK routine reads its code from the disk and OpenBLAS maps its buffers (~2 s for one
    200x200 eig in a restored guest); done here, it is in every restored copy already."""
    np: Any = sys.modules.get("numpy")
    if np is None:
        return
    try:
        # 256: past LAPACK's block-size cross-overs, so the blocked code paths are loaded too
        a = np.random.default_rng(0).random((256, 256)) + np.eye(256) * 256
        la = np.linalg
        for op in (la.eig, la.eigh, la.svd, la.inv, la.det, la.qr, la.cholesky, la.eigvals):
            op(a @ a.T if op is la.cholesky else a)
        la.solve(a, a[0])
        la.lstsq(a, a[0], rcond=None)
        np.fft.fft(a[0])
        np.random.default_rng(0).random(8).sort()
        (a.astype(np.float32) @ a.astype(np.float32)).sum()
        (a.astype(np.complex128) @ a).sum()
    except Exception:
        pass  # a warm-up only: the program gets whatever it would have got


def _spare_bytes() -> int:
    """MemAvailable less ember.agent.heap.RESERVE_MIB: the budget is checked again at touch time,
    after the preload modules took their share."""
    try:
        with open("/proc/meminfo", "rb") as f:
            for line in f:
                if line.startswith(b"MemAvailable:"):
                    return max(0, (int(line.split()[1]) >> 10) - RESERVE_MIB) << 20
    except (OSError, ValueError, IndexError):
        pass
    return 1 << 62


def _make_holder(keep: list[Any]) -> int:
    """Clone a task that shares this process's memory and only sleeps (see the pool's docs).

    ``clone(syscall, stack, CLONE_VM | CLONE_PARENT | SIGCHLD, SYS_pause)``: the new task runs
    ``syscall(SYS_pause)`` on a small stack of its own and nothing else, never Python code. Its
    parent is the agent, so the program never sees an extra child. It is cloned while this
    process holds no descriptor but /dev/null and the agent's socket: a copy of the program's
    pipes in its descriptor table would keep them open after the program's exit.
    """
    if os.uname().machine != "x86_64":
        return 0
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        stack = ctypes.create_string_buffer(HOLDER_STACK)
        keep.append(stack)  # must outlive the holder: a signal handler may run on it
        top = (ctypes.addressof(stack) + HOLDER_STACK - 64) & ~15
        clone = libc.clone
        clone.restype = ctypes.c_int
        clone.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
        entry = ctypes.cast(libc.syscall, ctypes.c_void_p)
        pid = clone(entry, top, CLONE_VM | CLONE_PARENT | SIGCHLD, ctypes.c_void_p(SYS_PAUSE))
        return pid if pid > 0 else 0
    except Exception:
        return 0  # no holder: the program's exit just costs what a real process's does


def _rehearse(heap: int, keep: set[str]) -> int:
    """Touch now what a program's start will touch; the pages touched (``{"op": "warm"}``).

    In a sandbox restored from a template each page a process touches first costs a shadow
    page fault and a host fault (~25 us here): ~3,500 of them, ~100 ms, in a pre-started
    interpreter's first program. A sandbox restored ahead of its use (a spare) asks for
    this while it waits. The compiler and the eval loop are rehearsed by compiling and
    running a throwaway program, the hand-over's own steps by doing them on copies. Memory
    is read a byte a page: the heap (but the pre-faulted block's tail, which small programs
    never reach) and the stack; what every program writes is written back unchanged: the
    interpreter's and libc's data (their globals, malloc's arena) and the first
    :data:`REHEARSED_HEAP` of the block, where its allocations land. That costs the host
    ~3 MiB of private memory per interpreter; the rest stays shared with the template.
    """
    return sum(_rehearsal(heap, keep))


def _rehearsal(heap: int, keep: set[str]) -> Iterator[int]:
    """:func:`_rehearse` in steps of at most :data:`STEP_PAGES` pages, each yielding its count."""
    import ctypes  # imported in the template already (_Flags)

    namespace: dict[str, Any] = {"__builtins__": __builtins__}
    exec(compile(_REHEARSAL, "<rehearsal>", "exec", dont_inherit=True), namespace)
    marshal.loads(marshal.dumps({"argv": ["python3"], "env": dict(os.environ)}))
    _ = set(sys.modules) - keep
    page = os.sysconf("SC_PAGE_SIZE")
    with open("/proc/self/maps", "rb") as maps:
        lines = maps.read().splitlines()
    reads: list[tuple[int, int]] = []
    writes: list[tuple[int, int]] = []
    data_of = (b"python3", b"libc.so")
    data_end = -1  # where python3's or libc's data ends: an unnamed mapping right there is .bss
    for line in lines:
        fields = line.split()
        low, high = (int(x, 16) for x in fields[0].split(b"-"))
        name = fields[5] if len(fields) > 5 else b""
        writable = fields[1].startswith(b"rw")
        ours = any(part in name.rsplit(b"/", 1)[-1] for part in data_of)
        if name == b"[heap]":
            block = max(low, high - heap)  # the block is the heap's top, as the template freed it
            reads.append((low, block if heap else high))
            if heap:
                writes.append((block, min(high, block + REHEARSED_HEAP)))
        elif name == b"[stack]":
            reads.append((low, high))
        elif writable and (ours or (not name and low == data_end and high - low <= MAX_BSS)):
            writes.append((low, high))
        data_end = high if writable and ours else -1
    pages = 0
    for low, high in reads:
        for address in range(low, high, page):
            ctypes.string_at(address, 1)
            pages += 1
            if pages == STEP_PAGES:
                yield pages
                pages = 0
    for low, high in writes:
        for address in range(low, high, page):
            byte = ctypes.c_char.from_address(address)
            byte.value = byte.value  # the same byte back: a write, no change
            pages += 1
            if pages == STEP_PAGES:
                yield pages
                pages = 0
    yield pages


def _warm_forked(ctl: int, keep: set[str]) -> None:
    """A forked member's copy-on-write faults, taken while it waits rather than in its job.

    Every page a forked member writes first is still its mother's: a guest page fault and a
    copy (~3 ms here). Its first program would take ~600 of them (the hand-over ~500, a small
    program ~100, counted on a host); after this warm-up, ~150-250. The warm-up costs ~2,000
    faults of its own, so it runs in steps, and stops as soon as a job is waiting on ``ctl``:
    the member says ``ready`` first, and an exec never waits for a warm-up.
    """
    import _socket

    sock = _socket.socket(fileno=ctl)

    def pending() -> bool:
        try:
            sock.recv(1, _socket.MSG_PEEK | _socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        except OSError:
            pass
        return True  # a job, or the agent closed the socket: the caller reads which

    try:
        if pending():
            return
        for _ in _warm_steps(keep):
            if pending():
                return
    finally:
        sock.detach()


def _warm_steps(keep: set[str]) -> Iterator[int]:
    """Most faults saved per fault taken first (counted on a host): the reseed, the small
    programs, then the rehearsal (~550 faults to save ~200)."""
    _reseed()  # random's and numpy's state, which the hand-over reseeds again
    yield 0
    for source in _WARM_PROGRAMS:
        exec(compile(source, "<warm>", "exec", dont_inherit=True), {})
        yield 0
    yield from _rehearsal(0, keep)


_REHEARSAL = """\
def _words(n):
    return [f"{i}:{str(i) * 2}" for i in range(n)]
_table = {"list": _words(16), "tuple": tuple(_words(4)), "set": set(_words(8))}
_text = " ".join(sorted(_table["set"])).encode().decode()
try:
    raise ValueError(_text[:8])
except ValueError as _exc:
    _table["error"] = repr(_exc)
"""


# Small programs a forked member runs while it waits, each a step of its warm-up (a job that
# arrives meanwhile waits for the step in hand only): what programs commonly do first.
_WARM_PROGRAMS = (
    """\
class _Point:
    def __init__(self, x, y):
        self.x, self.y = x, y
_points = sorted((_Point(i % 17, i * 3.5) for i in range(500)), key=lambda p: (p.x, -p.y))
_words = " ".join(f"{p.x}-{p.y:.1f}" for p in _points[:64]).split()
""",
    """\
try:
    {}["missing"]
except KeyError as _exc:
    _error = repr(_exc)
_table = {i: str(i) for i in range(2000)}
""",
    """\
import io, json, collections
_out = io.StringIO()
print(collections.Counter("abracadabra").most_common(2), file=_out)
json.loads(json.dumps({str(i): [i, i * 0.5] for i in range(500)}))
""",
    """\
_blobs = [bytes(n) for n in range(1, 4096, 5)]
_text = "".join(chr(32 + i % 90) for i in range(20000)).encode().decode()
""",
)


def _receive_job(ctl: int) -> tuple[dict[str, Any], list[int]]:
    """The job, with the program's pipe ends attached: stdout and stderr, then stdin's, if any."""
    import _socket  # built into python3; dropped from sys.modules at hand-over

    sock = _socket.socket(fileno=ctl)
    try:
        first, ancillary, _, _ = sock.recvmsg(1 << 16, _socket.CMSG_SPACE(3 * 4))
        fds: list[int] = []
        for level, kind, data in ancillary:
            if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
                fds += [
                    int.from_bytes(data[i : i + 4], sys.byteorder)
                    for i in range(0, len(data) - 3, 4)
                ]
        if len(first) < 4 or len(fds) > 3:
            raise EOFError
        size = int.from_bytes(first[:4], "big")
        body = first[4:]
        if len(body) < size:
            body += _read_exact(ctl, size - len(body))
    finally:
        sock.detach()
    message = marshal.loads(body)
    if not isinstance(message, dict):
        raise EOFError
    return message, fds


def _mother(ctl: int, keep: set[str]) -> tuple[int, int, int]:
    """Be the pool's mother: fork a member each time the agent asks (``{"op": "fork"}``, the
    member's control socket attached), never run a program. Returns in each child, with its
    control socket, the heap it is to touch and the priority its program is to have.

    A refill by a fresh ``python3`` costs ~20 s of guest time here (start-up ~5 s, ``import
    numpy`` ~14 s); a fork of this interpreter, which has done both and has no heap, ~1 s.
    The child is the agent's, not ours (:class:`_Forker`): the agent reaps it like any other
    member, and the mother has nothing to report."""
    try:
        forker = _Forker()
    except OSError as exc:
        _send(ctl, {"ready": False, "error": f"cannot fork members: {exc}"})
        os._exit(1)
    _send(ctl, {"ready": True, "pid": os.getpid(), "mother": True})
    # Her forks, and her children's warm-ups, are background work: at nice 19 a request's
    # program and the agent get the one vCPU (page-fault work runs at the faulting task's
    # priority too). A child goes back to the agent's priority when it takes a job.
    priority = os.getpriority(os.PRIO_PROCESS, 0)
    os.setpriority(os.PRIO_PROCESS, 0, BACKGROUND_NICE)
    while True:
        try:
            spec, fds = _receive_job(ctl)
        except (EOFError, OSError, ValueError):
            os._exit(0)  # the agent went away or is shutting the pool down
        if spec.get("op") != "fork" or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            _send(ctl, {"error": "not a fork request"})
            continue
        try:
            pid = forker.fork()
        except OSError as exc:
            os.close(fds[0])
            _send(ctl, {"error": f"fork: {exc}"})
            continue
        if pid == 0:
            os.close(ctl)
            os.setsid()  # a session and process group of its own, as a started member has
            return fds[0], int(spec.get("heap", 0)), priority
        os.close(fds[0])
        _send(ctl, {"pid": pid})


class _Forker:
    """``fork()`` whose child's parent is our parent: ``clone(CLONE_PARENT | SIGCHLD)``.

    The agent can then wait for the child's exit status as for any member it started itself.
    glibc's ``fork()`` cannot set ``CLONE_PARENT``, so the system call is made here and the
    child-side fix-ups ``fork()`` does that matter to a process with one thread are done too:
    the kernel writes the child's thread id into glibc's ``struct pthread`` (``raise()``,
    ``pthread_kill`` and mutex owners read it: left alone it would name the mother), and
    Python's own ``PyOS_BeforeFork``/``PyOS_AfterFork_*`` run as ``os.fork`` runs them, with
    the GIL held throughout (``PyDLL``). With more than one thread, locks another thread holds
    would be copied held: the mother refuses then (numpy's BLAS runs one thread on one vCPU).
    """

    def __init__(self) -> None:
        import ctypes

        if os.uname().machine != "x86_64":
            raise OSError("only on x86_64")
        threads = len(os.listdir("/proc/self/task"))
        if threads != 1:
            raise OSError(f"the mother has {threads} threads, not 1")
        self._ctypes = ctypes
        self._libc = libc = ctypes.PyDLL(None, use_errno=True)
        libc.pthread_self.restype = ctypes.c_void_p
        libc.syscall.restype = ctypes.c_long
        self._tid = libc.pthread_self() + self._tid_offset(libc.pthread_self())

    def _tid_offset(self, thread: int) -> int:
        """Where glibc keeps the thread id in ``struct pthread`` (0x2d0 in every x86_64 glibc
        since 2.25), checked against the kernel's answer rather than trusted."""
        tid = self._libc.syscall(SYS_GETTID)
        read = self._ctypes.c_int.from_address
        if read(thread + TID_OFFSET).value == tid:
            return TID_OFFSET
        hits = [off for off in range(0, 4096, 4) if read(thread + off).value == tid]
        if len(hits) != 1:
            raise OSError("cannot find the thread id in glibc's struct pthread")
        return hits[0]

    def fork(self) -> int:
        ctypes, api = self._ctypes, self._ctypes.pythonapi
        flags = CLONE_PARENT | CLONE_CHILD_SETTID | SIGCHLD
        api.PyOS_BeforeFork()
        pid = self._libc.syscall(
            ctypes.c_long(SYS_CLONE), ctypes.c_ulong(flags), None, None,
            ctypes.c_void_p(self._tid), ctypes.c_ulong(0),
        )  # fmt: skip
        if pid == 0:
            api.PyOS_AfterFork_Child()
            return 0
        errno = ctypes.get_errno()
        api.PyOS_AfterFork_Parent()
        if pid < 0:
            raise OSError(errno, os.strerror(errno))
        return int(pid)


def wait(argv: list[str], boot_globals: dict[str, Any], baseline: set[str]) -> Job:
    """Start-up work, ``ready``, then block until the agent hands over a job (BOOT calls this)."""
    ctl, generation, heap = (int(a) for a in argv[:3])
    mother = argv[3] == "mother"
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
    # stay; modules only this file needed are dropped at hand-over.
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
    forked = False
    priority = 0
    if mother and not error:
        # Returns only in each interpreter this one forks: that carries on below as a member.
        ctl, heap, priority = _mother(ctl, keep)
        generation = -1  # its generators are its mother's, as in every sibling: reseed
        forked = True
    if heap > 0 and not error:
        heap = min(heap, _spare_bytes())
        block = bytearray(heap)  # every page written once; freed into a heap that keeps it
        del block
    site = sys.modules.get("site")
    user_site = getattr(site, "USER_SITE", None) if site is not None else None
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
            "preloaded": sorted(preloaded),  # what programs will find in sys.modules
        },
    )
    if error:
        os._exit(1)
    if forked:
        _warm_forked(ctl, keep)
    while True:
        try:
            spec, fds = _receive_job(ctl)
        except (EOFError, OSError, ValueError):
            os._exit(0)  # the agent went away or is shutting the pool down
        if spec.get("op") != "warm":
            break
        _send(ctl, {"pages": _rehearse(heap, keep)})
    if len(fds) not in (2, 3):
        os._exit(0)  # a job without its pipes: not from our agent
    if forked:
        os.setpriority(os.PRIO_PROCESS, 0, priority)  # out of the background (see _mother)
    job = Job(spec, boot_globals)
    job.alive = alive
    job.apply((ctl, *fds), flags if flags and flags.works else None, state)
    return job
