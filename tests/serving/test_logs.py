"""The log formats: text lines that client input cannot split or forge, and one JSON object a line."""

from __future__ import annotations

import json
import logging

import pytest

from app.serving.observability.logs import EscapingFormatter, JsonFormatter, escape, make_formatter

FORGED = "x\n2026-11-30 12:00:00 app INFO FORGED\r\x1b[2J\u2028done"


def record(msg: str, *args: object, exc: BaseException | None = None, **extra: object) -> logging.LogRecord:
    rec = logging.LogRecord("app.test", logging.WARNING, __file__, 1, msg, args,
                            (type(exc), exc, exc.__traceback__) if exc else None)
    rec.__dict__.update(extra)
    return rec


def test_escape_writes_every_control_and_line_separator_as_an_escape():
    assert escape(FORGED) == "x\\n2026-11-30 12:00:00 app INFO FORGED\\r\\x1b[2J\\u2028done"
    assert escape("кот 🐈 ok") == "кот 🐈 ok"


def test_text_records_stay_one_line_and_tracebacks_cannot_pass_for_a_record():
    try:
        raise ValueError(f"bad model name {FORGED}")
    except ValueError as exc:
        line = EscapingFormatter("%(levelname)s %(message)s").format(record("path %s", FORGED, exc=exc))
    first, *rest = line.split("\n")
    assert first == "WARNING path " + escape(FORGED)
    assert rest and all(part.startswith("    | ") for part in rest)
    assert not any(part.startswith("2026") for part in line.split("\n"))


def test_json_records_are_one_object_a_line_with_the_access_fields():
    line = JsonFormatter().format(record("access %s", FORGED, request_id="r1", status=404, route="/x",
                                         duration_ms=1.5, tenant="team-a", unrelated="not copied"))
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["message"] == "access " + FORGED
    fields = (entry["request_id"], entry["status"], entry["route"], entry["duration_ms"], entry["tenant"])
    assert fields == ("r1", 404, "/x", 1.5, "team-a")
    assert entry["level"] == "WARNING" and entry["logger"] == "app.test" and "unrelated" not in entry


def test_unknown_log_format_is_refused():
    with pytest.raises(ValueError, match="text, json"):
        make_formatter("xml")
