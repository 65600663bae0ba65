"""Log output for the server: human-readable lines or one JSON object a line, never forgeable.

Every string a client controls (paths, model names, header values, exception messages quoting them)
can carry line breaks or terminal escapes. The text formatter escapes control characters in the
message, and indents traceback lines, so one record is always one line that starts with our prefix; the
JSON formatter escapes by construction. `configure_logging` puts one handler on the root logger and on
KServe's and uvicorn's loggers (which KServe configures not to propagate), so every line has one format.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"

#: Fields an access record may carry (`extra=`), written as JSON keys by the JSON formatter.
ACCESS_FIELDS = ("request_id", "method", "route", "path", "status", "duration_ms", "client", "protocol",
                 "tenant")

# C0 controls, DEL, C1 controls and the Unicode line/paragraph separators: each becomes an escape.
_ESCAPES = {c: f"\\x{c:02x}" for c in [*range(0x20), 0x7F, *range(0x80, 0xA0)]}
_ESCAPES.update({ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t", 0x2028: "\\u2028", 0x2029: "\\u2029"})

_OUR_LOGGERS = ("kserve", "kserve.trace", "uvicorn", "uvicorn.error", "uvicorn.access")


def escape(text: str) -> str:
    """`text` with every control character written as an escape, so it stays on one log line."""
    return text.translate(_ESCAPES)


class EscapingFormatter(logging.Formatter):
    """The usual text line, with the message escaped and traceback lines indented under it."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        record.message = escape(record.message)
        return super().formatMessage(record)

    def formatException(self, ei: Any) -> str:  # noqa: N802
        # A traceback ends with the exception's message, which may quote client input: keep it under
        # the record, each line indented, so nothing in it can pass for a record of its own.
        text = super().formatException(ei)
        return "\n".join("    | " + escape(line) for line in text.splitlines())

    def formatStack(self, stack_info: str) -> str:  # noqa: N802
        return "\n".join("    | " + escape(line) for line in stack_info.splitlines())


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message, access fields, and any traceback."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in ACCESS_FIELDS:
            if key in record.__dict__:
                entry[key] = record.__dict__[key]
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def make_formatter(fmt: str) -> logging.Formatter:
    if fmt == "json":
        return JsonFormatter()
    if fmt == "text":
        return EscapingFormatter(TEXT_FORMAT)
    raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, got {fmt!r}")


def configure_logging(fmt: str = "text", level: int = logging.INFO) -> None:
    """One stderr handler with the chosen format for our, KServe's and uvicorn's loggers.

    uvicorn's own access log is switched off: `app.access` writes one line per request instead, with
    the request id, route, status and duration (see app/serving/http.py).
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(make_formatter(fmt))
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level)
    for name in _OUR_LOGGERS:
        logger = logging.getLogger(name)
        # KServe reconfigures its logger when it finds it without handlers: give it ours, not none.
        logger.handlers = [handler]
        logger.propagate = False
    logging.getLogger("uvicorn.access").disabled = True
