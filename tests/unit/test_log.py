"""The log line format: ``LineFormatter`` caches the date and time per second, and must write exactly what
``logging.Formatter(FORMAT)`` writes."""

from __future__ import annotations

import logging
import sys

from hypothesis import given
from hypothesis import strategies as st

from postroom import log


def record_at(created: float, msg: str = "stored id=%s") -> logging.LogRecord:
    record = logging.LogRecord("postroom.smtp.adapter", logging.INFO, __file__, 1, msg, ("abc",), None)
    record.created = created
    record.msecs = int((created - int(created)) * 1000) + 0.0
    return record


@given(st.lists(st.floats(min_value=1.6e9, max_value=2.0e9, allow_nan=False), min_size=1, max_size=20))
def test_lines_match_the_standard_formatter_across_seconds(times: list[float]) -> None:
    ours, standard = log.LineFormatter(), logging.Formatter(log.FORMAT)
    for created in sorted(times) + sorted(times, reverse=True):  # forwards, then back across seconds
        record = record_at(created)
        assert ours.format(record) == standard.format(record)


def test_the_same_second_reuses_the_stamp_and_keeps_the_milliseconds() -> None:
    ours = log.LineFormatter()
    first = ours.format(record_at(1_800_000_000.125))
    second = ours.format(record_at(1_800_000_000.75))
    assert first.split(",")[0] == second.split(",")[0]
    assert first.split(",")[1].startswith("125 ") and second.split(",")[1].startswith("750 ")


@given(
    st.sampled_from([logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR, 5]),
    st.text(max_size=40),
    st.text(max_size=20),
)
def test_any_level_name_and_message_match_the_standard_formatter(level: int, name: str, text: str) -> None:
    def record() -> logging.LogRecord:
        r = logging.LogRecord(name or "root", level, __file__, 1, "%s: %r", (text, text), None)
        r.created, r.msecs = 1_800_000_000.5, 500.0
        return r

    assert log.LineFormatter().format(record()) == logging.Formatter(log.FORMAT).format(record())


def test_a_traceback_is_formatted_the_standard_way() -> None:
    try:
        raise ValueError("planted")
    except ValueError:
        exc = sys.exc_info()

    def record() -> logging.LogRecord:
        r = logging.LogRecord("postroom.x", logging.ERROR, __file__, 1, "failed %d", (3,), exc)
        r.created, r.msecs = 1_800_000_000.25, 250.0
        return r

    line = log.LineFormatter().format(record())
    assert line == logging.Formatter(log.FORMAT).format(record())
    assert "ValueError: planted" in line
