"""Logging: structlog for our events and the stdlib's, through one redacting pipeline.

Every line, ours or a library's (asyncio, aiosqlite), is rendered by the same
`ProcessorFormatter` on one root handler; `privacy.redact` runs over it last
before rendering, after exceptions and stacks are formatted, so their text is
covered too. `install_process_hooks` sends what Python would print to stderr
itself (uncaught exceptions in any thread, unraisable errors, warnings) through
the same pipeline.

At the default level times are whole seconds: per-call lines with milliseconds
could be matched against a carrier's call records.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from voiceline.privacy import redact

HANDLER_NAME = "voiceline"
FORMATS = ("console", "json")
OUR_LOGGER = "voiceline"  # our loggers' common parent; every other logger is a library's


class _Timestamper:
    """ISO 8601 UTC time: whole seconds, milliseconds only when logging at debug."""

    def __init__(self, timespec: str) -> None:
        self._timespec = timespec

    def __call__(self, _: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
        event_dict["timestamp"] = datetime.now(UTC).isoformat(timespec=self._timespec).replace("+00:00", "Z")
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
        try:
            self.stream.write(self.format(note) + self.terminator)
            self.flush()
        except Exception:
            pass  # the stream itself is broken (a closed pipe): lose the line, never raise into the caller


def _renderer(format: str) -> Processor:
    if format == "json":
        return structlog.processors.JSONRenderer()
    return structlog.dev.ConsoleRenderer(colors=False)


def _level_number(level: str) -> int:
    levelno = logging.getLevelNamesMapping().get(level.upper())
    if levelno is None:
        raise ValueError(f"unknown log level {level!r}")
    return levelno


def configure_logging(
    format: str = "console", level: str = "info", stream: TextIO = sys.stdout, library_level: str = "info"
) -> None:
    """Send structlog and stdlib logging to `stream`, one redacted line per event.

    Our loggers log at `level`; every other logger (asyncio, aiosqlite, which at
    debug writes each SQL statement with its parameters) at `library_level` or
    `level`, whichever is higher. Calling it again replaces the previous set-up
    instead of adding to it.
    """
    if format not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}")
    levelno = _level_number(level)
    library_levelno = max(levelno, _level_number(library_level))

    # Run for both structlog events and foreign (stdlib) records.
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        _Timestamper("milliseconds" if levelno <= logging.DEBUG else "seconds"),
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
    # A logger that does not propagate and has no handler of its own would print raw to stderr.
    logging.lastResort = handler
    root.setLevel(library_levelno)
    logging.getLogger(OUR_LOGGER).setLevel(levelno)

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


_process_log = get_logger("voiceline.process")


def _report_unloggable(exc_type: type[BaseException]) -> None:
    # Logging itself failed: the type name is all that may reach stderr.
    try:
        sys.__stderr__.write(f"voiceline: uncaught {exc_type.__name__}\n")  # type: ignore[union-attr]
    except Exception:
        pass


def _on_uncaught(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    try:
        _process_log.critical("process.uncaught_exception", error_type=exc_type.__name__, exc_info=(exc_type, exc, tb))
    except Exception:
        _report_unloggable(exc_type)


def _on_thread_uncaught(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return  # as the stdlib hook: a thread's SystemExit is silent
    try:
        _process_log.critical(
            "thread.uncaught_exception",
            thread=args.thread.name if args.thread else None,
            error_type=args.exc_type.__name__,
            exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
        )
    except Exception:
        _report_unloggable(args.exc_type)


def _on_unraisable(args: sys.UnraisableHookArgs) -> None:
    # An error Python can only ignore (in __del__, a weakref or atexit callback).
    # Never render `args.object`: its repr may carry call data.
    try:
        exc_info = (args.exc_type, args.exc_value, args.exc_traceback) if args.exc_value is not None else None
        _process_log.error(
            "process.unraisable",
            message=args.err_msg or "Exception ignored",
            object_type=type(args.object).__qualname__,
            error_type=args.exc_type.__name__,
            exc_info=exc_info,
        )
    except Exception:
        _report_unloggable(args.exc_type)


def install_process_hooks() -> None:
    """Route what Python itself would print to stderr through the redacting pipeline.

    Uncaught exceptions (main thread and other threads), unraisable errors and
    warnings become log lines; their tracebacks are redacted like any other.
    """
    logging.captureWarnings(True)
    sys.excepthook = _on_uncaught
    threading.excepthook = _on_thread_uncaught
    sys.unraisablehook = _on_unraisable
