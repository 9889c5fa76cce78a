"""Command line: `voiceline serve`, `status`, `drain`, `stats`, `voiceline trunk|line ...` and `voiceline sim call`."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import replace
from typing import Any, NoReturn

from voiceline import __version__
from voiceline import config as config_module
from voiceline.config import Config, ConfigError


class _Parser(argparse.ArgumentParser):
    """Bad arguments: one clear line on stderr and exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="voiceline", description="Anonymous one-on-one voice line over SIP.")
    parser.add_argument("--version", action="version", version=f"voiceline {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    serve = commands.add_parser("serve", help="run the SIP service")
    serve.add_argument("--config", metavar="FILE", help="TOML configuration file (defaults are embedded)")
    serve.add_argument("--listen", metavar="HOST:PORT", help="SIP UDP and TCP address (sip.listen)")
    serve.add_argument("--rtp-ports", metavar="LO-HI", help="RTP port range (media.rtp_ports)")
    serve.add_argument("--data-dir", metavar="DIR", help="directory for the database (storage.data_dir)")
    serve.add_argument("--log-format", choices=("json", "console"), help="log output format (log.format)")

    status = commands.add_parser("status", help="what the running service is doing now")
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    status.add_argument("--watch", nargs="?", type=float, const=2.0, metavar="SECONDS", help="refresh in place")
    drain = commands.add_parser("drain", help="let a running service finish its calls and exit (503 to new calls)")
    drain.add_argument("--undo", action="store_true", help="take new calls again (needs the control socket)")
    for command in (status, drain):
        command.add_argument("--config", metavar="FILE", help="the service's TOML configuration file")
        command.add_argument("--data-dir", metavar="DIR", help="the service's data directory (storage.data_dir)")

    from voiceline.provisioning_cli import add_provisioning_parsers
    from voiceline.sim.cli import add_sim_parser
    from voiceline.stats_cli import add_stats_parser

    add_provisioning_parsers(commands)
    add_stats_parser(commands)
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
    from voiceline.startup import StartFailed

    configure_logging(cfg.log.format, cfg.log.level, library_level=cfg.log.library_level)
    # From here on a crash is a redacted log line on stdout, never a raw traceback on stderr.
    install_process_hooks()

    async def main() -> int:
        install_loop_exception_handler(asyncio.get_running_loop())
        return await serve(cfg, args.config)

    try:
        return run_async(main)
    except StartFailed as failure:
        print(f"voiceline: cannot start: {redact(str(failure))}", file=sys.stderr)
        return failure.code
    except ConfigError as exc:  # found only at start: a line's prompt file or journey settings
        print(f"voiceline: config error: {redact(str(exc))}", file=sys.stderr)
        return 2


def _data_dir(args: argparse.Namespace) -> str:
    return str(args.data_dir or config_module.load(args.config).storage.data_dir)


def status_command(args: argparse.Namespace) -> int:
    from voiceline.control import CONTROL_SOCKET, CommandError, format_status, request

    try:
        data_dir = Path(_data_dir(args))
    except ConfigError as exc:
        print(f"voiceline: config error: {exc}", file=sys.stderr)
        return 2
    while True:
        try:
            status = request(data_dir / CONTROL_SOCKET, "status")
        except CommandError as exc:
            print(f"voiceline: status: {exc}", file=sys.stderr)
            return 1
        except OSError:
            return _no_answer(data_dir)
        text = json.dumps(status, indent=2) + "\n" if args.json else format_status(status)
        if args.watch is None:
            sys.stdout.write(text)
            return 0
        sys.stdout.write("\x1b[H\x1b[J" + text)  # home, clear: redraw in place
        sys.stdout.flush()
        time.sleep(max(0.2, args.watch))


def drain_command(args: argparse.Namespace) -> int:
    """Ask the service through its control socket; nothing is ever signalled by a pid read from a file."""
    from voiceline.control import CONTROL_SOCKET, CommandError, request

    try:
        data_dir = Path(_data_dir(args))
    except ConfigError as exc:
        print(f"voiceline: config error: {exc}", file=sys.stderr)
        return 2
    command = "undrain" if args.undo else "drain"
    try:
        request(data_dir / CONTROL_SOCKET, command)
    except CommandError as exc:
        print(f"voiceline: {command}: {exc}", file=sys.stderr)
        return 1
    except OSError:
        return _no_answer(data_dir)
    print("voiceline: taking calls again" if args.undo else "voiceline: draining")
    return 0


def _no_answer(data_dir: Path) -> int:
    """The control socket did not answer: whether a service holds the data dir tells the two cases apart."""
    from voiceline.datadir_lock import owner_of

    try:
        owner = owner_of(data_dir)
    except OSError as exc:
        print(f"voiceline: no service answers in {data_dir}; its lock cannot be read: {exc.strerror}", file=sys.stderr)
        return 1
    if owner is None:
        print(f"voiceline: no running service in {data_dir}", file=sys.stderr)
        return 1
    print(
        f"voiceline: a service (pid {owner or 'not yet known'}) holds {data_dir} but its control socket does not"
        " answer (starting or stopping?): see its log; `systemctl kill -s USR1 --kill-whom=main voiceline` drains it",
        file=sys.stderr,
    )
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    try:
        status = _run(argv)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's own flush at exit
        return status
    except BrokenPipeError:
        # The reader went away (`voiceline trunk list | head`): stop quietly, without a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _run(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return serve_command(args)
    if args.command == "drain":
        return drain_command(args)
    if args.command == "status":
        try:
            return status_command(args)
        except KeyboardInterrupt:  # the end of --watch
            return 0
    if args.command in ("trunk", "line"):
        from voiceline.provisioning_cli import run_provisioning

        return run_provisioning(args)
    if args.command == "stats":
        from voiceline.stats_cli import run_stats

        return run_stats(args)
    from voiceline.sim.cli import run_sim

    return run_sim(args)
