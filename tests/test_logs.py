import asyncio
import io
import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from voiceline import logs

CANARY = "+15550001234"
CANARY_DIGITS = "15550001234"


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    level = root.level
    yield
    for handler in [h for h in root.handlers if h.get_name() == logs.HANDLER_NAME]:
        root.removeHandler(handler)
    root.setLevel(level)
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
    logs.get_logger("t").info("media.ready", rtp="127.0.0.1:20000", ports="20000-29999", ssrc=3735928559, jitter=0.02)
    (line,) = json_lines(stream)
    assert line["rtp"] == "127.0.0.1:20000" and line["ports"] == "20000-29999"
    assert line["ssrc"] == 3735928559 and line["jitter"] == 0.02


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
    logs.get_logger("t").debug("once")
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
