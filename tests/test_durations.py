"""Go ``time.Duration`` parsing, shared by the subscribe flags and the operator's CRD fields."""

from __future__ import annotations

import pytest

from inference_cache import durations


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("0", 0.0),
        ("100ms", 0.1),
        ("10s", 10.0),
        ("1m30s", 90.0),
        ("1h", 3600.0),
        ("1.5s", 1.5),
        (".5s", 0.5),
        ("-1.5s", -1.5),
        ("+2m", 120.0),
        ("250us", 250e-6),
        ("250µs", 250e-6),
        (" 5m ", 300.0),
    ],
)
def test_go_durations(text: str, seconds: float) -> None:
    assert durations.parse(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5", "5x", "1m30", "s", "-", "1s garbage", "1d"])
def test_what_go_refuses_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        durations.parse(text)
