"""structlog set-up: configured once by the process entry point.

JSON lines when output is not a terminal (what log shippers want), coloured
console lines on a TTY. The request id is bound with contextvars so every line
logged while handling a request carries it, in the API and in the consumer.
"""

from __future__ import annotations

import logging
import sys

import structlog


def configure_logging(level: str = "info", force_json: bool | None = None) -> None:
    as_json = (not sys.stderr.isatty()) if force_json is None else force_json
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if as_json else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
