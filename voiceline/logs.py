"""Logging: structlog for our events and the stdlib's, through one redacting pipeline.

Every line, ours or a library's (asyncio, aiosqlite), is rendered by the same
`ProcessorFormatter` on one root handler; `privacy.redact` runs over it last
before rendering, so exception text and stack traces are covered too.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from voiceline.privacy import redact

HANDLER_NAME = "voiceline"
FORMATS = ("console", "json")


def _timestamp(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    # Milliseconds, not microseconds: a 6-digit fraction would be redacted.
    event_dict["timestamp"] = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return event_dict


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, bool | int | float) or value is None:
        return value  # numbers keep their JSON type
    if isinstance(value, dict):
        return {_scrub(k): _scrub(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_scrub(v) for v in value]
    if isinstance(value, BaseException):
        return redact(f"{type(value).__name__}: {value}")
    # Renderers would repr() anything else (bytes, objects): redact that text.
    return redact(repr(value))


def redact_event(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    """The structlog processor form of `privacy.redact`, over every value."""
    return {key: _scrub(value) for key, value in event_dict.items()}


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    def handleError(self, record: logging.LogRecord) -> None:
        # The stdlib default prints the raw message and arguments to stderr,
        # unredacted; report the failure through our own pipeline instead.
        note = logging.makeLogRecord(
            {"name": record.name, "msg": "log.format_error", "levelno": logging.ERROR, "levelname": "ERROR"}
        )
        self.stream.write(self.format(note) + self.terminator)
        self.flush()


def _renderer(format: str) -> Processor:
    if format == "json":
        return structlog.processors.JSONRenderer()
    return structlog.dev.ConsoleRenderer(colors=False)


def configure_logging(format: str = "console", level: str = "info", stream: TextIO = sys.stdout) -> None:
    """Send structlog and stdlib logging to `stream`, one redacted line per event.

    Calling it again replaces the previous set-up instead of adding to it.
    """
    if format not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}")
    levelno = logging.getLevelNamesMapping().get(level.upper())
    if levelno is None:
        raise ValueError(f"unknown log level {level!r}")

    # Run for both structlog events and foreign (stdlib) records.
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        _timestamp,
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
    ]
    handler = _Handler(stream)  # flushes after every record
    handler.set_name(HANDLER_NAME)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                redact_event,
                _renderer(format),
            ],
        )
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == HANDLER_NAME]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(levelno)

    structlog.configure(
        processors=[structlog.stdlib.filter_by_level, *shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        # Module-level loggers may be used before configure_logging runs.
        cache_logger_on_first_use=False,
    )


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    return structlog.stdlib.get_logger(name)


_loop_log = get_logger("voiceline.loop")


def _on_loop_error(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    # Never log the context dict: it may hold transports, handles and
    # callback arguments, i.e. packet data.
    exc = context.get("exception")
    if exc is None:
        # Without an exception asyncio's messages are fixed texts.
        _loop_log.error("loop.error", message=redact(str(context.get("message", ""))))
    else:
        # Skip the message here: "Exception in callback f(args)" reprs the args.
        _loop_log.error("loop.error", error_type=type(exc).__name__, error=redact(str(exc)), exc_info=exc)


def install_loop_exception_handler(loop: asyncio.AbstractEventLoop) -> None:
    """Route the loop's unhandled errors to structlog as `loop.error` events."""
    loop.set_exception_handler(_on_loop_error)
