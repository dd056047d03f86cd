"""structlog set-up: JSON lines in production, a readable console in development.

Our own loggers are structlog's native ones (a filtering bound logger writing straight to
stderr: the cheapest path, it runs for every webhook); the standard library's loggers
(uvicorn, RQ, httpx) go through ``ProcessorFormatter`` with the same processors, so every
line has the same shape and carries the context bound with ``structlog.contextvars``
(request id, job id), which is cleared after each request or job.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

_SHARED: list[structlog.typing.Processor] = [
    structlog.contextvars.merge_contextvars,
    structlog.processors.add_log_level,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
]


def _logger_name(
    logger: Any, method: str, event_dict: structlog.typing.EventDict
) -> structlog.typing.EventDict:
    """For standard-library records: the same ``logger_name`` key our own lines carry."""
    record = event_dict.get("_record")
    if record is not None:
        event_dict.setdefault("logger_name", record.name)
    return event_dict


def _renderer(fmt: str) -> structlog.typing.Processor:
    if fmt == "console":
        return structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    return structlog.processors.JSONRenderer()


# The level configure_logging set; structlog's own default configuration logs every level.
_level = logging.DEBUG


def enabled(level: int) -> bool:
    """Whether our loggers write lines of ``level``.

    For a line on the hot path that is usually filtered out: building its arguments and going
    through structlog's lazy proxy cost as much as validating the event, even when the line
    is then dropped.
    """
    return level >= _level


def configure_logging(fmt: str = "json", level: str = "info") -> None:
    global _level
    numeric = logging.getLevelName(level.upper())
    _level = numeric
    exceptions = [structlog.processors.format_exc_info] if fmt == "json" else []
    structlog.configure(
        processors=[*_SHARED, *exceptions, _renderer(fmt)],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*_SHARED, _logger_name],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                *exceptions,  # a record's exc_info as text (JSON cannot hold a traceback object)
                _renderer(fmt),
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    for name in ("uvicorn", "uvicorn.error", "rq.worker"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.access").disabled = True  # the receiver logs each request itself
    for chatty in ("httpx", "httpcore"):  # one line per HTTP call to Bridge is noise, not signal
        logging.getLogger(chatty).setLevel(max(logging.WARNING, numeric))


def get_logger(name: str) -> Any:
    """A structlog logger whose lines say where they come from (``logger_name``)."""
    return structlog.get_logger(logger_name=name)  # lazy: configuration applies on first use
