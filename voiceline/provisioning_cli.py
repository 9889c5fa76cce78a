"""`voiceline trunk ...` and `voiceline line ...`: argument parsing and output; the work is in voiceline.provisioning.

Bad input prints one line on stderr and exits 2. Output is a table, or JSON
with `--json`. Passwords are never printed: `show` says whether one is set.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from voiceline import config as config_module
from voiceline.codec_table import CODEC_NAMES
from voiceline.config import Config, ConfigError
from voiceline.journey_config import JourneyConfigError, parse_assignment
from voiceline.provisioning import LineJourney, Provisioning, ProvisioningError, TrunkChanges
from voiceline.routing import Trunk, parse_source
from voiceline.sip.message import Headers, SipRequest, SipResponse
from voiceline.sip.sdp import SRTP_POLICIES
from voiceline.sip.transaction import Timers, new_branch
from voiceline.sip.transport import open_udp
from voiceline.sip.core import CoreSettings
from voiceline.sip.useragent import UserAgent
from voiceline.storage import Storage, StorageError

TRUNK_COMMANDS = ("add", "list", "show", "update", "remove", "enable", "disable", "test")
LINE_COMMANDS = ("add", "update", "list", "show", "remove", "enable", "disable")


def add_provisioning_parsers(commands: Any) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="FILE", help="TOML configuration file (for storage.data_dir and config trunks)")
    common.add_argument("--data-dir", metavar="DIR", help="directory of the database (storage.data_dir)")
    common.add_argument("--json", action="store_true", help="print JSON instead of a table")

    trunk = commands.add_parser("trunk", help="provision SIP trunks (carriers)")
    actions = trunk.add_subparsers(dest="action", required=True, parser_class=type(trunk))
    for action in ("add", "update"):
        p = actions.add_parser(action, parents=[common], help=f"{action} a trunk")
        p.add_argument("name")
        _trunk_options(p, adding=action == "add")
    actions.add_parser("list", parents=[common], help="list trunks (config file and database)")
    for action, text in (("show", "show one trunk"), ("remove", "remove a trunk"), ("enable", "accept calls from a trunk"),
                         ("disable", "refuse calls from a trunk (and stop registering)")):  # fmt: skip
        actions.add_parser(action, parents=[common], help=text).add_argument("name")
    test = actions.add_parser("test", parents=[common], help="send OPTIONS to the trunk's registrar or addresses")
    test.add_argument("name")
    test.add_argument("--port", type=int, default=5060, help="port for sources given without one (default 5060)")
    test.add_argument("--timeout", type=float, default=4.0, help="seconds to wait for each answer (default 4)")

    line = commands.add_parser("line", help="provision lines (dialled numbers -> pairing pools)")
    line_actions = line.add_subparsers(dest="action", required=True, parser_class=type(line))
    add = line_actions.add_parser("add", parents=[common], help="add a line")
    add.add_argument("name")
    add.add_argument("--number", action="append", required=True, metavar="NUMBER",
                     help="dialled number (Request-URI user part) reaching this line; repeat for more; '*' for any")  # fmt: skip
    add.add_argument("--max-calls", type=int, default=0, help="callers on the line at once (0: no limit)")
    _journey_arguments(add)
    update = line_actions.add_parser("update", parents=[common], help="change a line")
    update.add_argument("name")
    update.add_argument("--number", action="append", metavar="NUMBER", help="replace the numbers with these; repeat")
    update.add_argument("--add-number", action="append", default=[], metavar="NUMBER", help="add one number; repeat")
    update.add_argument("--remove-number", action="append", default=[], metavar="NUMBER", help="remove one number; repeat")
    update.add_argument("--max-calls", type=int, help="callers on the line at once (0: no limit)")
    _journey_arguments(update)
    line_actions.add_parser("list", parents=[common], help="list lines")
    for action, text in (("show", "show one line"), ("remove", "remove a line"), ("enable", "take the line's calls"),
                         ("disable", "answer the line's calls with 480 (calls in progress go on)")):  # fmt: skip
        line_actions.add_parser(action, parents=[common], help=text).add_argument("name")


def _trunk_options(p: argparse.ArgumentParser, adding: bool) -> None:
    p.add_argument("--source", action="append", metavar="ADDR", help="IP, CIDR or host name calls come from; repeat")
    p.add_argument("--transport", action="append", choices=("udp", "tcp", "tls"), help="allowed transport; repeat")
    if not adding:
        p.add_argument("--add-source", action="append", default=[], metavar="ADDR", help="add one source; repeat")
        p.add_argument("--remove-source", action="append", default=[], metavar="ADDR", help="remove one source; repeat")
        p.add_argument("--add-transport", action="append", default=[], choices=("udp", "tcp", "tls"),
                       help="allow one more transport; repeat")  # fmt: skip
        p.add_argument("--remove-transport", action="append", default=[], choices=("udp", "tcp", "tls"),
                       help="stop allowing one transport; repeat")  # fmt: skip
    p.add_argument("--username", help="inbound digest user: INVITEs from this trunk must authenticate")
    p.add_argument("--password", help="inbound digest password ('-' reads it from stdin)")
    p.add_argument("--realm", help="inbound digest realm (default voiceline)")
    p.add_argument("--auth-algorithm", action="append", choices=("SHA-256", "MD5"),
                   help="digest algorithm to challenge with, preferred first; repeat (default SHA-256 then MD5)")  # fmt: skip
    p.add_argument("--auth-allow-rfc2069", action=argparse.BooleanOptionalAction, default=None,
                   help="accept digest answers without qop (old equipment; one request per challenge); default no")  # fmt: skip
    p.add_argument("--register", metavar="URI", dest="registrar", help="register at this registrar, e.g. sip:sip.carrier.net")
    p.add_argument("--register-username", help="registration user name")
    p.add_argument("--register-password", help="registration password ('-' reads it from stdin)")
    p.add_argument("--register-realm", help="expected registrar realm (default: whatever it challenges with)")
    p.add_argument("--expiry", type=int, help="requested registration expiry, seconds (default 3600)")
    p.add_argument("--contact-user", help="user part of our Contact (default: the registration user name)")
    p.add_argument("--codec", action="append", choices=CODEC_NAMES, help="allowed codec; repeat (default: all)")
    p.add_argument("--max-calls", type=int, help="concurrent calls from this trunk (0: no limit)")
    p.add_argument("--srtp", choices=SRTP_POLICIES, help="SRTP policy: off (default), optional or required")
    if adding:
        p.add_argument("--disabled", action="store_true", help="add it disabled")
    else:
        p.add_argument("--no-auth", action="store_true", help="stop challenging this trunk's INVITEs")
        p.add_argument("--no-register", action="store_true", help="stop registering")


def run_provisioning(args: argparse.Namespace) -> int:
    try:
        cfg = config_module.load(args.config)
        if args.data_dir:
            cfg = replace(cfg, storage=replace(cfg.storage, data_dir=args.data_dir))
        handler = _HANDLERS[(args.command, args.action)]
        return asyncio.run(_with_storage(cfg, lambda p: handler(p, args)))
    except (ConfigError, ProvisioningError) as exc:
        print(f"voiceline {args.command} {args.action}: error: {exc}", file=sys.stderr)
        return 2
    except StorageError as exc:  # locked (after CLI_BUSY_TIMEOUT), full, read-only, unusable
        print(f"voiceline {args.command} {args.action}: {exc}", file=sys.stderr)
        return 1


# How long a command waits for a database another process has locked before it gives up.
CLI_BUSY_TIMEOUT = 5.0


async def _with_storage(cfg: Config, work: Callable[[Provisioning], Awaitable[int]]) -> int:
    storage = await Storage.open(Path(cfg.storage.data_dir), cfg.storage.key_file, busy_timeout=CLI_BUSY_TIMEOUT)
    try:
        return await work(Provisioning(cfg, storage))
    finally:
        await storage.close()


def _secret(value: str | None, what: str) -> str | None:
    if value != "-":
        return value
    text = sys.stdin.readline().rstrip("\r\n")
    if not text:
        raise ProvisioningError(f"{what}: nothing on stdin")
    return text


def _changes(args: argparse.Namespace) -> TrunkChanges:
    for number in (args.max_calls, args.expiry):
        if number is not None and number < 0:
            raise ProvisioningError("--max-calls and --expiry must not be negative")
    return TrunkChanges(
        sources=tuple(args.source) if args.source else None,
        add_sources=tuple(getattr(args, "add_source", ())),
        remove_sources=tuple(getattr(args, "remove_source", ())),
        transports=tuple(dict.fromkeys(args.transport)) if args.transport else None,
        add_transports=tuple(getattr(args, "add_transport", ())),
        remove_transports=tuple(getattr(args, "remove_transport", ())),
        username=args.username,
        password=_secret(args.password, "--password"),
        realm=args.realm,
        auth_algorithms=tuple(dict.fromkeys(args.auth_algorithm)) if args.auth_algorithm else None,
        auth_allow_rfc2069=args.auth_allow_rfc2069,
        no_auth=getattr(args, "no_auth", False),
        registrar=args.registrar,
        register_username=args.register_username,
        register_password=_secret(args.register_password, "--register-password"),
        register_realm=args.register_realm,
        expiry=args.expiry,
        contact_user=args.contact_user,
        no_register=getattr(args, "no_register", False),
        codecs=tuple(dict.fromkeys(args.codec)) if args.codec else None,
        max_calls=args.max_calls,
        srtp=args.srtp,
    )


# -- trunk handlers -----------------------------------------------------------------


async def _trunk_add(p: Provisioning, args: argparse.Namespace) -> int:
    trunk = await p.add_trunk(args.name, _changes(args), enabled=not args.disabled)
    print(f"trunk {trunk.name} added" + (" (disabled)" if not trunk.enabled else ""))
    return 0


async def _trunk_update(p: Provisioning, args: argparse.Namespace) -> int:
    trunk = await p.update_trunk(args.name, _changes(args))
    print(f"trunk {trunk.name} updated")
    return 0


async def _trunk_remove(p: Provisioning, args: argparse.Namespace) -> int:
    await p.remove_trunk(args.name)
    print(f"trunk {args.name} removed")
    return 0


async def _trunk_enable(p: Provisioning, args: argparse.Namespace) -> int:
    enabled = args.action == "enable"
    await p.enable_trunk(args.name, enabled)
    print(f"trunk {args.name} {'enabled' if enabled else 'disabled'}")
    return 0


async def _trunk_list(p: Provisioning, args: argparse.Namespace) -> int:
    rows = await p.trunk_rows()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    table = [
        [
            row["name"],
            row["origin"],
            "yes" if row["enabled"] else "no",
            ",".join(row["sources"]) or "-",
            "digest" if row["username"] else "ip",
            _registration_summary(row),
            ",".join(row["codecs"]) or "all",
            str(row["max_calls"] or "-"),
            row["srtp"],
        ]
        for row in rows
    ]
    _print_table(["NAME", "ORIGIN", "ENABLED", "SOURCES", "AUTH", "REGISTRATION", "CODECS", "MAX CALLS", "SRTP"], table)
    return 0


async def _trunk_show(p: Provisioning, args: argparse.Namespace) -> int:
    row = next((r for r in await p.trunk_rows() if r["name"] == args.name), None)
    if row is None:
        raise ProvisioningError(f"no trunk named {args.name!r}")
    if args.json:
        print(json.dumps(row, indent=2))
        return 0
    _print_fields(row)
    return 0


async def _trunk_test(p: Provisioning, args: argparse.Namespace) -> int:
    trunk = await p.trunk(args.name)
    targets = _probe_targets(trunk, args.port)
    if not targets:
        raise ProvisioningError(f"trunk {trunk.name!r} has no single address to test (only ranges)")
    results = await _probe(p.config, targets, args.timeout)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for result in results:
            outcome = (
                f"answered {result['status']} {result['reason']} in {result['ms']:.1f} ms"
                if result["status"] else result["error"]
            )  # fmt: skip
            print(f"{result['target']}: {outcome}")
    return 0 if any(result["status"] for result in results) else 1


def _registration_summary(row: dict[str, Any]) -> str:
    status = row.get("registration_status")
    if status is None:
        return "-"
    return str(status["state"])


# -- line handlers ------------------------------------------------------------------


def _journey_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="the line's own journey or help setting, e.g. waiting.max_wait=300, help.destination=sip:... (README); repeat")  # fmt: skip
    parser.add_argument("--language", help="the line's prompt language (\"\": the [prompts] language)")
    parser.add_argument("--prompts", metavar="DIR", help="a directory of the line's own recordings (\"\": none)")


def _journey_changes(args: argparse.Namespace) -> LineJourney:
    try:
        overrides = tuple(parse_assignment(text) for text in args.set)
    except JourneyConfigError as exc:
        raise ProvisioningError(f"--set {exc}") from None
    prompts = args.prompts if not args.prompts else str(Path(args.prompts).resolve())  # the service runs elsewhere
    return LineJourney(args.language, prompts, overrides)


async def _line_add(p: Provisioning, args: argparse.Namespace) -> int:
    if args.max_calls < 0:
        raise ProvisioningError("--max-calls must not be negative")
    line = await p.add_line(args.name, tuple(dict.fromkeys(args.number)), args.max_calls, _journey_changes(args))
    print(f"line {line.name} added")
    return 0


async def _line_update(p: Provisioning, args: argparse.Namespace) -> int:
    if args.max_calls is not None and args.max_calls < 0:
        raise ProvisioningError("--max-calls must not be negative")
    line = await p.update_line(
        args.name,
        numbers=tuple(dict.fromkeys(args.number)) if args.number else None,
        add_numbers=tuple(args.add_number),
        remove_numbers=tuple(args.remove_number),
        max_calls=args.max_calls,
        journey=_journey_changes(args),
    )
    print(f"line {line.name} updated")
    return 0


async def _line_enable(p: Provisioning, args: argparse.Namespace) -> int:
    enabled = args.action == "enable"
    await p.update_line(args.name, enabled=enabled)
    print(f"line {args.name} {'enabled' if enabled else 'disabled'}")
    return 0


async def _line_remove(p: Provisioning, args: argparse.Namespace) -> int:
    await p.remove_line(args.name)
    print(f"line {args.name} removed")
    return 0


async def _line_list(p: Provisioning, args: argparse.Namespace) -> int:
    rows = await p.line_rows()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    table = [
        [r["name"], r["origin"], "yes" if r["enabled"] else "no", ",".join(r["numbers"]), str(r["max_calls"] or "-"),
         ",".join(f"{key}={value}" for key, value in r.get("help", {}).items()) or "-"]
        for r in rows
    ]  # fmt: skip
    _print_table(["NAME", "ORIGIN", "ENABLED", "NUMBERS", "MAX CALLS", "OWN HELP"], table)
    return 0


async def _line_show(p: Provisioning, args: argparse.Namespace) -> int:
    row = next((r for r in await p.line_rows() if r["name"] == args.name), None)
    if row is None:
        raise ProvisioningError(f"no line named {args.name!r}")
    if args.json:
        print(json.dumps(row, indent=2))
    else:
        _print_fields(row)
    return 0


_HANDLERS: dict[tuple[str, str], Callable[[Provisioning, argparse.Namespace], Awaitable[int]]] = {
    ("trunk", "add"): _trunk_add,
    ("trunk", "update"): _trunk_update,
    ("trunk", "remove"): _trunk_remove,
    ("trunk", "enable"): _trunk_enable,
    ("trunk", "disable"): _trunk_enable,
    ("trunk", "list"): _trunk_list,
    ("trunk", "show"): _trunk_show,
    ("trunk", "test"): _trunk_test,
    ("line", "add"): _line_add,
    ("line", "update"): _line_update,
    ("line", "enable"): _line_enable,
    ("line", "disable"): _line_enable,
    ("line", "remove"): _line_remove,
    ("line", "list"): _line_list,
    ("line", "show"): _line_show,
}


# -- output -------------------------------------------------------------------------


def _print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows)]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def _print_fields(row: dict[str, Any], indent: str = "") -> None:
    for key, value in row.items():
        if isinstance(value, dict):
            print(f"{indent}{key}:")
            _print_fields(value, indent + "  ")
        elif isinstance(value, list):
            print(f"{indent}{key}: {', '.join(map(str, value)) or '-'}")
        else:
            print(f"{indent}{key}: {'-' if value in ('', None) else value}")


# -- trunk test: OPTIONS pings --------------------------------------------------------


def _probe_targets(trunk: Trunk, default_port: int) -> list[tuple[str, int]]:
    targets: list[tuple[str, int]] = []
    if trunk.registration is not None:
        targets.append((trunk.registration.host, trunk.registration.port))
    for source in trunk.sources:
        parsed = parse_source(source)
        if isinstance(parsed, str):
            targets.append((parsed, default_port))
        elif parsed.num_addresses == 1:
            targets.append((str(parsed.network_address), default_port))
    return list(dict.fromkeys(targets))


async def _probe(cfg: Config, targets: list[tuple[str, int]], timeout: float) -> list[dict[str, Any]]:
    """OPTIONS to every address of every target (a host name may have several, IPv4 and IPv6)."""
    loop = asyncio.get_running_loop()
    addresses: list[tuple[str, tuple[str, int] | None]] = []  # (label, address or None: unresolved)
    for host, port in targets:
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        except OSError:
            addresses.append((_sip_uri(host, port), None))
            continue
        for address in dict.fromkeys(str(info[4][0]) for info in infos):
            label = _sip_uri(host, port) + ("" if address == host else f" ({address})")
            addresses.append((label, (address, port)))
    agents: dict[int, UserAgent] = {}
    transports = []
    try:
        for _, dest in addresses:
            family = socket.AF_INET6 if dest is not None and ":" in dest[0] else socket.AF_INET
            if dest is None or family in agents:
                continue
            local = _local_address(family, dest)
            agent = UserAgent(CoreSettings(local, timers=Timers(cfg.sip.t1, cfg.sip.t2, cfg.sip.t4)))
            transport = await open_udp(local, 0, agent.message_received)
            transports.append(transport)
            agent.attach(transport)
            agents[family] = agent

        async def ping(label: str, dest: tuple[str, int] | None) -> dict[str, Any]:
            if dest is None:
                return {"target": label, "status": 0, "reason": "", "ms": None, "error": "cannot resolve"}
            return await _ping(agents[socket.AF_INET6 if ":" in dest[0] else socket.AF_INET], label, dest, timeout)

        return list(await asyncio.gather(*(ping(label, dest) for label, dest in addresses)))
    finally:
        for transport in transports:
            transport.close()


def _sip_uri(host: str, port: int) -> str:
    return f"sip:[{host}]:{port}" if ":" in host else f"sip:{host}:{port}"


def _local_address(family: int, dest: tuple[str, int]) -> str:
    """Our address towards `dest` (connecting a UDP socket sends nothing): what Via and From carry."""
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.connect(dest)
        return str(probe.getsockname()[0])


async def _ping(agent: UserAgent, label: str, dest: tuple[str, int], timeout: float) -> dict[str, Any]:
    result: dict[str, Any] = {"target": label, "status": 0, "reason": "", "ms": None, "error": ""}
    started = time.monotonic()
    try:
        response: SipResponse | None = await asyncio.wait_for(agent.request(_options(agent, dest), dest), timeout)
    except asyncio.TimeoutError:
        response = None
    if response is None:
        result["error"] = f"no answer within {timeout:g} s"
        return result
    result.update(status=response.status, reason=response.reason, ms=(time.monotonic() - started) * 1000)
    return result


def _options(agent: UserAgent, dest: tuple[str, int]) -> SipRequest:
    assert agent.transport is not None
    local_port = agent.transport.local_address[1]
    local = agent.settings.advertised_host
    host = f"[{local}]" if ":" in local else local
    uri = _sip_uri(*dest)
    headers = Headers(
        [
            ("Via", f"SIP/2.0/UDP {host}:{local_port};branch={new_branch()};rport"),
            ("Max-Forwards", "70"),
            ("From", f"<sip:voiceline@{host}>;tag={secrets.token_hex(6)}"),
            ("To", f"<{uri}>"),
            ("Call-ID", secrets.token_hex(12)),
            ("CSeq", "1 OPTIONS"),
            ("Accept", "application/sdp"),
        ]
    )
    return SipRequest("OPTIONS", uri, headers)
