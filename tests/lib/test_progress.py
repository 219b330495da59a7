"""The one H:MM:SS formatter of the progress lines (propmaps_jax.progress)."""

import pytest

from propmaps_jax.progress import format_duration


@pytest.mark.parametrize(
    "seconds, text",
    [(0, "0:00:00"), (59.99, "0:00:59"), (3725, "1:02:05"), (90061, "25:01:01")],
)
def test_hours_minutes_seconds_rounded_down(seconds, text):
    assert format_duration(seconds) == text


def test_an_unknown_duration_is_a_question_mark():
    assert format_duration(float("inf")) == "?"
