import asyncio
import io
import json
import logging
import re
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import aiosqlite
import pytest
import structlog
from port_table import port_block
from rawsip import Dialer, RawPeer, address, serving, to_tag
from waiting import CONNECTING_SECONDS, until

from voiceline import logs
from voiceline.config import Config, MediaConfig, SipConfig, StorageConfig
from voiceline.journey_config import JourneyConfig, WelcomeConfig

CANARY = "+15550001234"
CANARY_DIGITS = "15550001234"
CALL_ID = re.compile(r"c-[a-z]{12}")
WHOLE_SECONDS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")
MILLISECONDS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    level, last_resort = root.level, logging.lastResort
    yield
    logging.lastResort = last_resort
    for handler in [h for h in root.handlers if h.get_name() == logs.HANDLER_NAME]:
        root.removeHandler(handler)
    root.setLevel(level)
    logging.getLogger(logs.OUR_LOGGER).setLevel(logging.NOTSET)
    structlog.reset_defaults()


def assert_no_canary(output: str) -> None:
    assert CANARY_DIGITS not in output
    assert "555 000 1234" not in output and "0001234" not in output


def emit_everything() -> None:
    log = logs.get_logger("voiceline.test")
    log.info("call.offer", from_uri=f"sip:{CANARY}@10.0.0.1", detail={"pai": [f"tel:{CANARY}"]}, raw=CANARY.encode())
    try:
        raise ValueError(f"unexpected caller {CANARY}")
    except ValueError:
        log.exception("call.failed")
        logging.getLogger("aiosqlite").exception("query failed")
    logging.getLogger("asyncio").error("Exception in callback on_datagram(%r)", f"INVITE sip:{CANARY}@x")


def json_lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_are_redacted() -> None:
    stream = io.StringIO()
    logs.configure_logging("json", "info", stream)
    emit_everything()
    output = stream.getvalue()
    assert_no_canary(output)
    offer, failed, stdlib_exc, stdlib = json_lines(stream)
    assert offer["event"] == "call.offer"
    assert offer["from_uri"] == "sip:[redacted]@10.0.0.1"
    assert offer["detail"] == {"pai": ["tel:[redacted]"]}
    assert offer["level"] == "info" and offer["logger"] == "voiceline.test"
    assert offer["timestamp"].endswith("Z")
    assert failed["level"] == "error"
    assert "Traceback" in failed["exception"] and "ValueError: unexpected caller [redacted]" in failed["exception"]
    assert "ValueError: unexpected caller [redacted]" in stdlib_exc["exception"]
    assert stdlib["logger"] == "asyncio" and stdlib["level"] == "error"
    assert "[redacted]" in stdlib["event"]


def test_console_lines_are_redacted() -> None:
    stream = io.StringIO()
    logs.configure_logging("console", "info", stream)
    emit_everything()
    output = stream.getvalue()
    assert_no_canary(output)
    assert "call.offer" in output and "from_uri=sip:[redacted]@10.0.0.1" in output
    assert output.count("ValueError: unexpected caller [redacted]") == 2
    assert "Exception in callback" in output
    assert "\x1b[" not in output


def test_what_logs_need_survives() -> None:
    stream = io.StringIO()
    logs.configure_logging("json", "info", stream)
    logs.get_logger("t").info(
        "media.ready", call="c-bcdfghjkmnpq", rtp="127.0.0.1:20000", network="198.51.100.0/24", ssrc=3735928559, jitter=0.02
    )
    (line,) = json_lines(stream)
    assert line["call"] == "c-bcdfghjkmnpq" and line["rtp"] == "127.0.0.1:20000" and line["network"] == "198.51.100.0/24"
    assert line["ssrc"] == 3735928559 and line["jitter"] == 0.02  # numbers stay numbers
    assert WHOLE_SECONDS.fullmatch(line["timestamp"])


def test_times_are_whole_seconds_at_info_and_milliseconds_only_at_debug() -> None:
    for level, shape in (("info", WHOLE_SECONDS), ("warning", WHOLE_SECONDS), ("debug", MILLISECONDS)):
        stream = io.StringIO()
        logs.configure_logging("json", level, stream)
        logs.get_logger("voiceline.t").warning("ours")
        logging.getLogger("asyncio").warning("a library's")
        stamps = [line["timestamp"] for line in json_lines(stream)]
        assert len(stamps) == 2 and all(shape.fullmatch(stamp) for stamp in stamps), (level, stamps)


def test_exception_text_is_redacted_after_formatting() -> None:
    stream = io.StringIO()
    logs.configure_logging("console", "info", stream)
    nbsp = CANARY.replace("555", "\u00a0555\u00a0").replace("0001", "000\u00a01")
    try:
        try:
            raise KeyError(nbsp)  # str(KeyError) is the repr: "\xa0" escapes
        except KeyError as exc:
            exc.add_note(f"while talking to mailto:{CANARY}@example.org")
            raise RuntimeError(f"caller {CANARY[:5]} {CANARY[5:]}") from exc
    except RuntimeError:
        logs.get_logger("voiceline.t").exception("call.failed", stack_info=True)
        error = sys.exc_info()
    # A record another handler already formatted carries its raw traceback in exc_text.
    record = logging.makeLogRecord({"name": "aiosqlite", "msg": "boom", "levelno": logging.ERROR, "levelname": "ERROR"})
    record.exc_info, record.exc_text = error, f"Traceback: caller {CANARY}"
    (handler,) = [h for h in logging.getLogger().handlers if h.get_name() == logs.HANDLER_NAME]
    handler.handle(record)
    output = stream.getvalue()
    assert_no_canary(output)
    assert "\\xa0555" not in output and "xa0000" not in output
    assert output.count("KeyError: '[redacted]'") == 2 and output.count("RuntimeError: caller [redacted]") == 2
    assert "while talking to mailto:[redacted]@example.org" in output and "Stack (most recent call last)" in output


def test_library_loggers_stay_at_info_unless_asked() -> None:
    stream = io.StringIO()
    logs.configure_logging("json", "debug", stream)
    logs.get_logger("voiceline.t").debug("ours")
    logging.getLogger("aiosqlite").debug("executing %r", CANARY)
    logging.getLogger("asyncio").info("a library's info")
    assert [line["event"] for line in json_lines(stream)] == ["ours", "a library's info"]

    stream = io.StringIO()
    logs.configure_logging("json", "debug", stream, library_level="debug")
    logging.getLogger("aiosqlite").debug("executing %r", CANARY)
    (line,) = json_lines(stream)
    assert line["event"] == "executing '[redacted]'"

    stream = io.StringIO()  # never below our own level
    logs.configure_logging("json", "warning", stream, library_level="debug")
    logging.getLogger("aiosqlite").info("hidden")
    logs.get_logger("voiceline.t").info("hidden too")
    assert stream.getvalue() == ""


def test_a_logger_that_does_not_propagate_is_redacted_too(capsys: pytest.CaptureFixture[str]) -> None:
    stream = io.StringIO()
    logs.configure_logging("json", "info", stream)
    lonely = logging.getLogger("lonelylibrary")
    lonely.propagate = False
    try:
        lonely.warning("caller %s", CANARY)  # no handler anywhere: the stdlib's last resort writes it
    finally:
        lonely.propagate = True
    assert capsys.readouterr().err == ""
    (line,) = json_lines(stream)
    assert line["event"] == "caller [redacted]" and line["logger"] == "lonelylibrary"


async def test_aiosqlite_statements_are_not_logged_at_our_debug_level(tmp_path: Path) -> None:
    async def insert_canary() -> str:
        stream = io.StringIO()
        logs.configure_logging("json", "debug", stream, library_level=library_level)
        async with aiosqlite.connect(tmp_path / "t.db") as db:
            await db.execute("CREATE TABLE IF NOT EXISTS t (caller TEXT)")
            await db.execute("INSERT INTO t VALUES (?)", (CANARY,))
        return stream.getvalue()

    library_level = "info"
    assert "aiosqlite" not in await insert_canary()
    library_level = "debug"  # asked for: every statement is there, its parameters redacted
    output = await insert_canary()
    assert "INSERT INTO t VALUES" in output and "[redacted]" in output
    assert_no_canary(output)


def test_context_variables_are_merged_and_redacted() -> None:
    stream = io.StringIO()
    logs.configure_logging("json", "info", stream)
    structlog.contextvars.bind_contextvars(call="c-bcdfghjkmnpq", peer=CANARY)
    try:
        logs.get_logger("t").info("call.answered")
    finally:
        structlog.contextvars.clear_contextvars()
    (line,) = json_lines(stream)
    assert line["call"] == "c-bcdfghjkmnpq" and line["peer"] == "[redacted]"


def test_level_filtering_applies_to_structlog_and_stdlib() -> None:
    stream = io.StringIO()
    logs.configure_logging("json", "warning", stream)
    logs.get_logger("t").info("hidden")
    logging.getLogger("aiosqlite").info("hidden too")
    logs.get_logger("t").warning("shown")
    logging.getLogger("asyncio").warning("shown too")
    assert [line["event"] for line in json_lines(stream)] == ["shown", "shown too"]


def test_reconfigure_replaces_the_handler() -> None:
    first, second = io.StringIO(), io.StringIO()
    logs.configure_logging("json", "info", first)
    logs.configure_logging("json", "debug", second)
    ours = [h for h in logging.getLogger().handlers if h.get_name() == logs.HANDLER_NAME]
    assert len(ours) == 1
    logs.get_logger("voiceline.t").debug("once")
    assert first.getvalue() == ""
    assert [line["event"] for line in json_lines(second)] == ["once"]


def test_broken_stdlib_call_does_not_dump_its_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    stream = io.StringIO()
    logs.configure_logging("json", "info", stream)
    (handler,) = [h for h in logging.getLogger().handlers if h.get_name() == logs.HANDLER_NAME]
    # Straight to our handler: pytest's own capture handler would raise on this record.
    bad = {"name": "sip", "msg": "two placeholders %s %s, one argument", "args": (CANARY,), "levelno": logging.ERROR}
    handler.handle(logging.makeLogRecord(bad))
    assert_no_canary(stream.getvalue() + capsys.readouterr().err)
    (line,) = json_lines(stream)
    assert line["event"] == "log.format_error" and line["level"] == "error" and line["logger"] == "sip"


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(ValueError):
        logs.configure_logging("xml")
    with pytest.raises(ValueError):
        logs.configure_logging("json", "chatty")


async def test_loop_exception_handler_logs_type_and_redacted_message() -> None:
    stream = io.StringIO()
    logs.configure_logging("json", "info", stream)
    loop = asyncio.get_running_loop()
    logs.install_loop_exception_handler(loop)

    def on_datagram(data: bytes) -> None:
        raise ValueError(f"bad From {CANARY}")

    loop.call_soon(on_datagram, f"INVITE sip:{CANARY}@x".encode())
    await asyncio.sleep(0)
    loop.call_exception_handler({"message": "Task was destroyed but it is pending!", "task": CANARY})

    output = stream.getvalue()
    assert_no_canary(output)
    with_exc, without_exc = json_lines(stream)
    assert with_exc["event"] == "loop.error" and with_exc["error_type"] == "ValueError"
    assert with_exc["error"] == "bad From [redacted]"
    assert "message" not in with_exc  # it would repr the callback's packet argument
    assert without_exc["event"] == "loop.error"
    assert without_exc["message"] == "Task was destroyed but it is pending!"
    assert "task" not in without_exc


SERVE_THAT_CRASHES = textwrap.dedent(
    """
    import asyncio, logging, sys, threading, warnings
    import voiceline.app
    from voiceline import cli

    CANARY = sys.argv[1]

    class Leaky:
        def __del__(self):
            raise ValueError(f"dropped caller {CANARY}")

    def on_datagram(data):
        raise ValueError(f"bad From {CANARY}")

    def worker():
        raise ValueError(f"thread saw {CANARY}")

    async def serve(config, config_file=None):
        warnings.warn(f"odd caller {CANARY}")
        logging.getLogger("somelibrary").error("caller %s", CANARY)
        thread = threading.Thread(target=worker, name=f"for {CANARY}")
        thread.start()
        thread.join()
        Leaky()
        asyncio.get_running_loop().call_soon(on_datagram, CANARY.encode())
        await asyncio.sleep(0)
        raise RuntimeError(f"crashed on caller {CANARY}")

    voiceline.app.serve = serve
    sys.exit(cli.main(["serve", "--data-dir", sys.argv[2], "--listen", "127.0.0.1:0", "--log-format", "json"]))
    """
)


@pytest.mark.integration
def test_a_crashing_service_writes_nothing_unredacted(tmp_path: Path) -> None:
    """Everything Python itself would print raw goes through the redacting log pipeline."""
    result = subprocess.run(
        [sys.executable, "-c", SERVE_THAT_CRASHES, CANARY, str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1
    assert result.stderr == ""
    assert_no_canary(result.stdout)
    lines = {line["event"]: line for line in map(json.loads, result.stdout.splitlines())}
    warning = next(line for line in lines.values() if line["logger"] == "py.warnings")
    assert "UserWarning: odd caller [redacted]" in warning["event"]
    assert lines["caller [redacted]"]["logger"] == "somelibrary"
    assert "ValueError: thread saw [redacted]" in lines["thread.uncaught_exception"]["exception"]
    assert lines["thread.uncaught_exception"]["thread"] == "for [redacted]"
    assert "ValueError: dropped caller [redacted]" in lines["process.unraisable"]["exception"]
    assert lines["process.unraisable"]["object_type"] == "function"  # Leaky.__del__, never its repr
    assert lines["loop.error"]["error"] == "bad From [redacted]"
    crash = lines["process.uncaught_exception"]
    assert crash["level"] == "critical" and "RuntimeError: crashed on caller [redacted]" in crash["exception"]


PAIRING_RTP_PORTS = "{}-{}".format(*port_block("test_logs"))


async def dial(peer: RawPeer, server: tuple[str, int]) -> Dialer:
    """A confirmed call from `peer` (no media: pairing needs none)."""
    dialer = Dialer(peer, server)
    dialer.invite(rtp_port=4000)
    dialer.ack(to_tag(await peer.response(status=200)))
    return dialer


async def logged(stream: io.StringIO, condition: Callable[[list[dict]], bool], timeout: float = 3.0) -> list[dict]:
    """The log lines so far, once `condition` holds for them."""
    try:
        await until(lambda: condition(json_lines(stream)), timeout)
    except AssertionError:
        raise AssertionError(f"never logged: {[line['event'] for line in json_lines(stream)]}") from None
    return json_lines(stream)


def count(event: str, at_least: int) -> Callable[[list[dict]], bool]:
    return lambda lines: sum(line["event"] == event for line in lines) >= at_least


@pytest.mark.integration
@pytest.mark.parametrize("level", ["info", "debug"])
async def test_no_line_links_partners_at_info(tmp_path: Path, level: str) -> None:
    """Two callers pair, one presses '#', then hangs up: each step a partner causes is logged without ids."""
    stream = io.StringIO()
    logs.configure_logging("json", level, stream)
    config = Config(
        sip=SipConfig(listen="127.0.0.1:0", answer_delay=0.01),
        media=MediaConfig(rtp_ports=PAIRING_RTP_PORTS),
        storage=StorageConfig(data_dir=str(tmp_path / "data")),
        journey=JourneyConfig(welcome=WelcomeConfig(enabled=False, offer_choice=False)),  # paired as soon as answered
    ).validate()
    peer = await RawPeer.open()
    try:
        async with serving(config) as app:
            server = address(app)
            first = await dial(peer, server)
            second = await dial(peer, server)
            await logged(stream, count("pairing.talking", 1), CONNECTING_SECONDS)
            first.in_dialog("INFO", body="Signal=#\r\nDuration=160\r\n", content_type="application/dtmf-relay")
            await logged(stream, count("pairing.waiting", 3))
            first.in_dialog("BYE")
            lines = await logged(stream, count("call.ended", 1))
            second.in_dialog("BYE")  # else stopping waits for our answer to its BYE
            await logged(stream, count("call.ended", 2))
    finally:
        peer.close()

    calls = sorted({line["call"] for line in lines if line["event"] == "call.offered"})
    assert len(calls) == 2
    events = [line["event"] for line in lines]
    assert events.count("pairing.next_partner_requested") == 1
    pair_lines = [line for line in lines if line["event"] in ("pairing.talking", "pairing.waiting")]
    assert len(pair_lines) == 4
    assert all(set(line) == {"event", "line", "waiting", "level", "logger", "timestamp"} for line in pair_lines)
    detail = [line for line in lines if line["event"] == "pairing.partners"]
    if level == "info":
        for line in lines:
            assert len(set(CALL_ID.findall(json.dumps(line)))) <= 1, line
            assert WHOLE_SECONDS.fullmatch(line["timestamp"])
        assert detail == []
    else:  # debug names partners, and says so in the README
        (partners,) = detail
        assert sorted([partners["call"], partners["partner"]]) == calls
        assert all(MILLISECONDS.fullmatch(line["timestamp"]) for line in lines)
