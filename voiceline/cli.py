"""Command line: `voiceline serve`, `voiceline drain`, `voiceline trunk|line ...` and `voiceline sim call`."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from pathlib import Path
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import replace
from typing import Any, NoReturn

from voiceline import config as config_module
from voiceline.config import Config, ConfigError


class _Parser(argparse.ArgumentParser):
    """Bad arguments: one clear line on stderr and exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="voiceline", description="Anonymous one-on-one voice line over SIP.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    serve = commands.add_parser("serve", help="run the SIP service")
    serve.add_argument("--config", metavar="FILE", help="TOML configuration file (defaults are embedded)")
    serve.add_argument("--listen", metavar="HOST:PORT", help="SIP UDP and TCP address (sip.listen)")
    serve.add_argument("--rtp-ports", metavar="LO-HI", help="RTP port range (media.rtp_ports)")
    serve.add_argument("--data-dir", metavar="DIR", help="directory for the database (storage.data_dir)")
    serve.add_argument("--log-format", choices=("json", "console"), help="log output format (log.format)")

    drain = commands.add_parser("drain", help="let a running service finish its calls and exit (503 to new calls)")
    drain.add_argument("--config", metavar="FILE", help="the service's TOML configuration file")
    drain.add_argument("--data-dir", metavar="DIR", help="the service's data directory (storage.data_dir)")

    from voiceline.provisioning_cli import add_provisioning_parsers
    from voiceline.sim.cli import add_sim_parser

    add_provisioning_parsers(commands)
    add_sim_parser(commands)
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    """The config file (or embedded defaults) with command-line flags on top."""
    cfg = config_module.load(args.config)
    if args.listen:
        cfg = replace(cfg, sip=replace(cfg.sip, listen=args.listen))
    if args.rtp_ports:
        cfg = replace(cfg, media=replace(cfg.media, rtp_ports=args.rtp_ports))
    if args.data_dir:
        cfg = replace(cfg, storage=replace(cfg.storage, data_dir=args.data_dir))
    if args.log_format:
        cfg = replace(cfg, log=replace(cfg.log, format=args.log_format))
    return cfg.validate()


def run_async(main: Callable[[], Coroutine[Any, Any, int]]) -> int:
    """Run on uvloop when it is installed, else the standard loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main())
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main())


def serve_command(args: argparse.Namespace) -> int:
    try:
        cfg = config_from_args(args)
    except ConfigError as exc:
        print(f"voiceline: config error: {exc}", file=sys.stderr)
        return 2

    from voiceline.app import serve
    from voiceline.logs import configure_logging, install_loop_exception_handler, install_process_hooks
    from voiceline.privacy import redact
    from voiceline.storage import StorageError

    configure_logging(cfg.log.format, cfg.log.level, library_level=cfg.log.library_level)
    # From here on a crash is a redacted log line on stdout, never a raw traceback on stderr.
    install_process_hooks()

    async def main() -> int:
        install_loop_exception_handler(asyncio.get_running_loop())
        return await serve(cfg)

    try:
        return run_async(main)
    except OSError as exc:
        print(f"voiceline: cannot start: {redact(str(exc.strerror or exc))}", file=sys.stderr)
        return 1
    except StorageError as exc:
        print(f"voiceline: cannot open storage: {redact(str(exc))}", file=sys.stderr)
        return 1


def drain_command(args: argparse.Namespace) -> int:
    """Send SIGUSR1 to the service whose pid file is in the data dir."""
    from voiceline.app import PID_FILE

    try:
        data_dir = args.data_dir or config_module.load(args.config).storage.data_dir
    except ConfigError as exc:
        print(f"voiceline: config error: {exc}", file=sys.stderr)
        return 2
    try:
        pid = int(Path(data_dir, PID_FILE).read_text(encoding="ascii").strip())
        os.kill(pid, signal.SIGUSR1)
    except (OSError, ValueError):
        print(f"voiceline: no running service found in {data_dir}", file=sys.stderr)
        return 1
    print(f"voiceline: draining (pid {pid})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return serve_command(args)
    if args.command == "drain":
        return drain_command(args)
    if args.command in ("trunk", "line"):
        from voiceline.provisioning_cli import run_provisioning

        return run_provisioning(args)
    from voiceline.sim.cli import run_sim

    return run_sim(args)
