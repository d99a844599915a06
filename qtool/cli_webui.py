"""`qtool webui`: parse, check, and start the Gradio page (qtool.webui). No logic of its own."""

from __future__ import annotations

import argparse
import socket
import sys
from pathlib import Path
from typing import Any


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "webui", help="quantize, compare, fine-tune, chat, merge and export from a browser (Gradio)",
        description="Serve a web page with one tab per job: Methods, Quantize, Compare, Fine-tune, Chat, "
                    "Merge / export. Long jobs run as background `qtool` processes that outlive the page: reload "
                    "and it re-attaches. Jobs, outputs and relative paths live in --root (default: here). "
                    "Needs the webui extra: pip install 'qtool[webui]'.",
        epilog="examples:\n  qtool webui                         # http://127.0.0.1:7860\n"
               "  qtool webui --port 8080 --allow ../shared/data   # also serve files from another folder",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 lets anyone who reaches "
                        "this machine start jobs, there is no login)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--root", default=".", metavar="DIR", help="working folder for jobs and relative paths (default: .)")
    p.add_argument("--allow", action="append", default=[], metavar="DIR",
                   help="another folder the page may serve files from (reports, plots); repeatable")


def cmd_webui(args: argparse.Namespace) -> int:
    from qtool.errors import BackendUnavailableError, SpecError

    root = Path(args.root).expanduser()
    if not root.is_dir():
        raise SpecError(f"--root {args.root} is not a folder")
    allowed = [Path(a).expanduser() for a in args.allow]
    for folder in allowed:
        if not folder.is_dir():
            raise SpecError(f"--allow {folder} is not a folder")
    if not 0 < args.port < 65536:
        raise SpecError(f"--port takes 1..65535, got {args.port}")
    _check_port(args.host, args.port)
    try:
        from qtool.webui import app
    except ImportError as exc:
        raise BackendUnavailableError(f"qtool webui needs Gradio ({exc}): pip install 'qtool[webui]'") from None
    import logging

    logging.getLogger("httpx").setLevel(logging.WARNING)  # Gradio's start-up self-checks, one line each
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        sys.stderr.write(f"qtool: serving on {args.host}: anyone who can reach this machine can start jobs (no login)\n")
    print(f"qtool webui: http://{'127.0.0.1' if args.host == '0.0.0.0' else args.host}:{args.port} "
          f"(jobs in {root.resolve() / '.qtool-webui'}; Ctrl-C stops the page, not the jobs)", flush=True)
    app.launch(root, args.host, args.port, allowed, block=True)
    return 0


def _check_port(host: str, port: int) -> None:
    from qtool.errors import SpecError

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds: TIME_WAIT is no clash
        try:
            probe.bind((host, port))
        except OSError as exc:
            import errno

            hint = ("another program, or another qtool webui? choose --port" if exc.errno == errno.EADDRINUSE
                    else "check --host: an address of this machine, e.g. 127.0.0.1 or 0.0.0.0")
            raise SpecError(f"cannot serve on {host}:{port}: {exc.strerror or exc} ({hint})") from None
