"""Inside a pre-started interpreter: the job applied, and the program run and ended as
``python3`` runs and ends it (see :mod:`ember.agent.pystart` for the whole story).

Standard library only (it runs in the guest; see :mod:`ember.agent.pybase` for how).
"""

from __future__ import annotations

import _weakref
import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:  # no run-time import: these files must not add to sys.modules
    from typing import Any

if __name__ != "ember_pystart":  # imported as a module; in BOOT's namespace they are there
    from ember.agent.pybase import _Flags, _reseed, _restart_clocks, _write_all
    from ember.agent.pymain import (
        _abspath,
        _cannot_open,
        _getimporter,
        _io_encoding,
        _job_script,
        _read_all,
        _stdio,
    )
    from ember.agent.pywarm import _ordered_profile, _read_pages, _written_pages


_sys: Any = sys  # for the attributes typeshed calls final or does not know
_ZIP_END = b"PK\x05\x06"


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
        self.written: list[bytes] = []  # a probe's pages written, hand-over and program
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
        if len(self.written) == 1:  # a probe: what its program wrote, before the ending's
            self.written.append(_written_pages())
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
        if len(self.written) == 2:
            handed, ran = self.written
            _report_profile(_ordered_profile(handed, ran, _written_pages(), _read_pages()))
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

        # Modules only these files needed go; any the steps below import (a codec for
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
        old_tz, old_tzpath = os.environ.get("TZ"), os.environ.get("PYTHONTZPATH")
        os.environ.clear()
        os.environ.update(spec["env"])
        if os.environ.get("TZ") != old_tz and "time" in sys.modules:
            sys.modules["time"].tzset()
        if os.environ.get("PYTHONTZPATH") != old_tzpath and "zoneinfo" in sys.modules:
            _reset_tzpath(sys.modules["zoneinfo"])
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
            _reseed(_seed_of(spec))
        _restart_clocks()
        atexit.register(self._exit_by_sigint)  # first registered, so it runs last
        for name in drop:
            sys.modules.pop(name, None)
        self.baseline = set(sys.modules)  # what the program found: not its to tear down
        self._prepare_main(spec)
        if spec.get("profile") is True:  # a probe: what the hand-over wrote comes first
            self.written = [_written_pages()]

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
            self.script = _job_script(path, spec.get("script"))
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


def _reset_tzpath(zoneinfo: Any) -> None:
    """``zoneinfo`` (a preload module) read ``PYTHONTZPATH`` at its import, in the template.
    A job that sets it runs in a real ``python3`` unless ``-E``/``-I`` hid it from the
    interpreter, but zoneinfo reads ``os.environ`` itself, so it is read again here. Its
    warning about relative entries is for a program that imports zoneinfo, not for all."""
    warnings: Any = sys.modules.get("warnings")  # no import here: see pybase
    if warnings is None:
        zoneinfo.reset_tzpath()
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        zoneinfo.reset_tzpath()


def _seed_of(spec: dict[str, Any]) -> bytes:
    """The agent's seed for this program's generators (``ResumeState.job_seed``), or b""
    (the kernel's, as before) when there is none or it is not 32 bytes of hex."""
    seed = spec.get("seed")
    if not isinstance(seed, str) or len(seed) != 64:
        return b""
    try:
        return bytes.fromhex(seed)
    except ValueError:
        return b""


def _report_profile(data: bytes) -> None:
    """A probe's last words (the agent's ``profile`` job, ``ember.agent.poolprobe``): the pages
    it wrote (``pywarm._ordered_profile``), raw on its stderr, which its program leaves empty."""
    try:
        _write_all(2, data)
    except OSError:
        pass  # the agent stopped listening: it gets no profile


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
    """Drop the leading frames of BOOT and of these files (one namespace, ``globals()``):
    tracebacks start at the program."""
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_globals is boot_globals or frame.f_globals is globals():
            tb = tb.tb_next
        else:
            break
    return tb
