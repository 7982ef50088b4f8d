"""``ember serve`` (the daemon), ``ember ps``, ``ember kill`` and ``ember logs`` (its clients;
``ember exec --id`` is in :mod:`ember.cli.run`).

FastAPI, uvicorn and httpx are imported inside the commands, so ``ember``
itself (and the VMM processes it runs) work without the ``serve`` extra.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from ember.errors import ConfigError

DEFAULT_LISTEN = "127.0.0.1:7777"
MAX_CONSOLE_LINES = 1000  # what GET /sandboxes/ID/console?lines= allows


class JsonLogs(logging.Formatter):
    """One JSON object a line: time, level, event, and the sandbox id when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        event: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "event": record.getMessage(),
        }
        sandbox = getattr(record, "sandbox", None)
        if sandbox is not None:
            event["sandbox"] = sandbox
        if record.exc_info:
            event["error"] = self.formatException(record.exc_info)
        return json.dumps(event)


def register(sub: Any) -> None:
    serve = sub.add_parser(
        "serve",
        help="run the sandbox daemon (HTTP API)",
        description="Serve sandboxes over HTTP (OpenAPI at /openapi.json, /docs). Sandboxes "
        "survive a restart of the daemon: the next one re-adopts them from its state dir.",
    )
    serve.add_argument("--listen", default=DEFAULT_LISTEN, metavar="HOST:PORT")
    serve.add_argument(
        "--token-file",
        type=Path,
        default=None,
        metavar="F",
        help="bearer token file (made 0600 at first start; default STATE_DIR/token)",
    )
    serve.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        metavar="D",
        help="records of the daemon's sandboxes (default ~/.local/state/ember/serve)",
    )
    serve.add_argument("--max-body-mib", type=int, default=128, metavar="MiB")
    serve.add_argument(
        "--reap-interval",
        type=float,
        default=1.0,
        metavar="S",
        help="how often sandboxes past their timeout are killed",
    )
    serve.add_argument(
        "--spares", type=int, default=0, metavar="N",
        help="keep N sandboxes of the default shape restored and warmed: a create takes one "
        "(ready in ~1 ms, its first call as fast as a later one); each costs ~30 MiB",
    )  # fmt: skip
    serve.set_defaults(func=_serve)
    ps = sub.add_parser("ps", help="list the daemon's sandboxes")
    _client_args(ps)
    ps.add_argument("--json", action="store_true", help="one JSON object per sandbox")
    ps.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE")
    ps.set_defaults(func=_ps)
    kill = sub.add_parser("kill", help="destroy sandboxes of the daemon")
    _client_args(kill)
    kill.add_argument("ids", nargs="+", metavar="ID")
    kill.set_defaults(func=_kill)
    logs = sub.add_parser(
        "logs",
        help="print the guest console of a daemon's sandbox",
        description="Print the tail of sandbox ID's guest console (kernel messages, the VMM's "
        "stop reason; a crashed sandbox's last words).",
    )
    _client_args(logs)
    logs.add_argument("id", metavar="ID")
    logs.add_argument(
        "-n", "--lines", type=int, default=30, metavar="N", help="the last N lines (default 30)"
    )
    logs.set_defaults(func=_logs)
    mcp = sub.add_parser(
        "mcp",
        help="serve sandboxes as MCP tools over stdio (for AI agents)",
        description="A Model Context Protocol server on stdin/stdout: create_sandbox, run_code, "
        "exec_command, read_file, write_file, list_files, kill_sandbox. With --server (or "
        "$EMBER_SERVER) the sandboxes are the daemon's; else they live in this process.",
    )
    mcp.add_argument("--server", default=None, metavar="URL")
    mcp.set_defaults(func=_mcp)


def _client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--server",
        default=None,
        metavar="URL",
        help="the daemon (default $EMBER_SERVER, else http://127.0.0.1:7777)",
    )


def server_url(args: argparse.Namespace) -> str:
    url: str | None = args.server or os.environ.get("EMBER_SERVER")
    return url or f"http://{DEFAULT_LISTEN}"


def _listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--listen {value!r}: give HOST:PORT, e.g. {DEFAULT_LISTEN}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _descriptors_for_many() -> None:
    """The daemon holds ~13 descriptors per live sandbox, and a soft RLIMIT_NOFILE of 1,024
    (a common default) would stop it near 75: take the hard limit, as servers do."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from ember.sandbox.wire import default_state_dir
        from ember.serve.app import create_app
        from ember.serve.manager import Manager
        from ember.serve.state import StateDir
    except ImportError as exc:
        raise ConfigError(
            f"ember serve needs the serve extra: pip install 'ember[serve]' ({exc})"
        ) from None
    host, port = _listen(args.listen)
    os.environ.pop("EMBER_SERVER", None)  # the daemon's own Sandbox() calls stay in-process
    _descriptors_for_many()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLogs())
    logging.getLogger("ember.serve").addHandler(handler)
    logging.getLogger("ember.serve").setLevel(logging.INFO)
    state = StateDir(args.state_dir or default_state_dir())
    token = state.token(args.token_file)
    manager = Manager(state, reap_interval=args.reap_interval)
    app = create_app(manager, token=token, max_body=args.max_body_mib << 20)  # metrics first
    manager.start()  # re-adopts (and kills the spares a crashed daemon left)
    if args.spares:
        from ember.sandbox import spares
        from ember.serve.spare_records import SpareRecords

        spares.watch(SpareRecords(state))
        spares.keep_warm(args.spares)
    try:
        token_file = args.token_file or state.path / "token"
        print(f"ember serve: http://{host}:{port} (token in {token_file})", flush=True)
        uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
    finally:
        manager.stop()
    return 0


def _ps(args: argparse.Namespace) -> int:
    from ember.sandbox.remote import list_sandboxes

    metadata = dict(item.partition("=")[::2] for item in args.metadata)
    found = list_sandboxes(server=server_url(args), metadata=metadata)
    if args.json:
        for info in found:
            print(json.dumps(info))
        return 0
    print(f"{'ID':<28} {'STATE':<8} {'TEMPLATE':<12} {'AGE':>7}  METADATA")
    now = time.time()
    for info in found:
        meta = ",".join(f"{k}={v}" for k, v in info["metadata"].items())
        age = f"{now - info['created_at']:.0f}s"
        print(f"{info['id']:<28} {info['state']:<8} {info['template']:<12} {age:>7}  {meta}")
    return 0


def _kill(args: argparse.Namespace) -> int:
    from ember.sandbox.remote import Api

    api = Api(server_url(args))
    status = 0
    try:
        for sandbox_id in args.ids:
            try:
                api.call("DELETE", f"/sandboxes/{sandbox_id}")
            except Exception as exc:
                print(f"ember: {sandbox_id}: {exc}", file=sys.stderr)
                status = 1
    finally:
        api.close()
    return status


def _logs(args: argparse.Namespace) -> int:
    from ember.sandbox.remote import Api

    if not 1 <= args.lines <= MAX_CONSOLE_LINES:
        raise ConfigError(f"--lines {args.lines}: give 1..{MAX_CONSOLE_LINES}")
    api = Api(server_url(args))
    try:
        reply = api.call("GET", f"/sandboxes/{args.id}/console", params={"lines": args.lines})
    finally:
        api.close()
    text = str(reply["console"])
    if text:
        print(text)
    return 0


def _mcp(args: argparse.Namespace) -> int:
    try:
        from ember.serve.mcp_server import run_stdio
    except ImportError as exc:
        raise ConfigError(
            f"ember mcp needs the serve extra: pip install 'ember[serve]' ({exc})"
        ) from None
    run_stdio(args.server or os.environ.get("EMBER_SERVER", ""))
    return 0
