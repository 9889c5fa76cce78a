"""`voiceline sim call`: place simulated calls from the command line.

`voiceline/cli.py` adds the parser with `add_sim_parser` and dispatches to
`run_sim`. pjsua2 is imported only by the worker processes, so the server's
command line works without it.
"""

from __future__ import annotations

import argparse
from typing import Any
import importlib.util
import itertools
import sys
import tempfile
from pathlib import Path

from voiceline.sim.runner import CALLER_CODECS, TRANSPORTS, CallSpec, run_calls

INSTALL_HINT = "voiceline sim needs pjsua2: install with pip install 'voiceline[sim]'"
# Beyond the last call's planned end: ringing, answer delay and teardown.
TIMEOUT_MARGIN_SECONDS = 30.0


def add_sim_parser(subparsers: "argparse._SubParsersAction[Any]") -> argparse.ArgumentParser:
    """Add `sim call ...` to a command line's subcommands and return the `sim` parser."""
    sim: argparse.ArgumentParser = subparsers.add_parser("sim", help="simulated SIP callers (needs pip install 'voiceline[sim]')")
    commands = sim.add_subparsers(dest="sim_command", required=True, metavar="COMMAND")
    call = commands.add_parser(
        "call",
        help="call a SIP URI with simulated callers and print one JSON report per call",
        description="Place simulated calls (real pjsua2 user agents on loopback) and print one "
        "JSON report per line. Exit status 0 when every call connected, 1 otherwise.",
    )
    call.add_argument("target", metavar="TARGET_URI", help="e.g. sip:voiceline@127.0.0.1:5060")
    call.add_argument("--calls", type=int, default=1, metavar="N", help="number of calls (default 1)")
    call.add_argument(
        "--tone",
        type=float,
        nargs="+",
        action="extend",
        default=[],
        metavar="HZ",
        help="tone each call sends: call i sends tone i, cycling (default: silence)",
    )
    call.add_argument("--seconds", type=float, default=5.0, metavar="S", help="stay connected S seconds (default 5)")
    call.add_argument("--stagger", type=float, default=0.0, metavar="S", help="call i starts at i*S seconds")
    call.add_argument("--dtmf", default="", metavar="DIGITS", help="digits sent (RFC 4733) 1 s after connect")
    call.add_argument(
        "--from",
        dest="from_users",
        nargs="+",
        action="extend",
        default=[],
        metavar="USER",
        help="From user part of call i, cycling (default anonymous)",
    )
    call.add_argument("--transport", choices=TRANSPORTS, default="udp")
    call.add_argument(
        "--tls-ca-file", default="", metavar="PEM", help="with --transport tls: verify the server against this CA"
    )
    call.add_argument(
        "--codec",
        nargs="+",
        choices=list(CALLER_CODECS),
        default=["G711"],
        help="the one codec call i offers, cycling (default G711: PCMU and PCMA)",
    )
    call.add_argument("--srtp", action="store_true", help="offer SRTP only (RTP/SAVP keyed by SDES a=crypto)")
    call.add_argument(
        "--record-dir", type=Path, metavar="DIR", help="where to keep recordings (default: a new temporary directory)"
    )
    return sim


def build_specs(args: argparse.Namespace) -> list[CallSpec]:
    """One CallSpec per call; raises ValueError on arguments that make no sense."""
    if args.calls < 1:
        raise ValueError("--calls must be at least 1")
    if args.stagger < 0:
        raise ValueError("--stagger must not be negative")
    tones = itertools.cycle(args.tone or [None])
    users = itertools.cycle(args.from_users or ["anonymous"])
    codecs = itertools.cycle(args.codec)
    return [
        CallSpec(
            args.target,
            seconds=args.seconds,
            tone_hz=next(tones),
            from_user=next(users),
            start_after=index * args.stagger,
            dtmf=args.dtmf,
            transport=args.transport,
            codec=next(codecs),
            srtp=args.srtp,
        )
        for index in range(args.calls)
    ]


def run_sim(args: argparse.Namespace) -> int:
    """Run `voiceline sim call`: 0 if every call connected, 1 if not, 2 for bad arguments."""
    if importlib.util.find_spec("pjsua2") is None:
        print(INSTALL_HINT, file=sys.stderr)
        return 2
    try:
        specs = build_specs(args)
    except ValueError as exc:
        print(f"voiceline sim call: {exc}", file=sys.stderr)
        return 2
    record_dir = args.record_dir or Path(tempfile.mkdtemp(prefix="voiceline-sim-"))
    timeout = specs[-1].start_after + args.seconds + TIMEOUT_MARGIN_SECONDS
    reports = run_calls(specs, record_dir=record_dir, timeout=timeout, tls_ca_file=args.tls_ca_file)
    for report in reports:
        print(report.to_json(), flush=True)
    return 0 if all(report.connected for report in reports) else 1
