"""The receptive-field / image-content rule reaches every outcome on made-up numbers."""

import pytest

from propmaps_jax.analysis import readings
from propmaps_jax.errors import PropmapsError

R = readings


def interval(cls: str, units: str) -> dict:
    """A made-up interval of class `cls` for a test in `units`."""
    scale = 1.0 if units == "rate" or cls == R.ZERO else 4.0
    lo, hi = {
        R.POSITIVE: (0.10, 0.20),
        R.NEGATIVE: (-0.20, -0.10),
        R.ZERO: (-0.02, 0.03),
        R.INCONCLUSIVE: (-0.15, 0.15),
    }[cls]
    return {"estimate": scale * (lo + hi) / 2, "lo": scale * lo, "hi": scale * hi}


def measured_as(which: dict[str, str]) -> dict:
    """Intervals making each named test favour `which[name]` (a reading or other)."""
    out = {}
    for name, target in which.items():
        p = R.PREDICTION_BY_NAME[name]
        if target == R.RECEPTIVE_FIELD:
            cls = p.receptive_field
        elif target == R.CONTENT:
            cls = p.content
        elif target == R.INCONCLUSIVE:
            cls = R.INCONCLUSIVE
        else:  # neither: a class that neither reading predicts
            cls = next(
                c
                for c in (R.POSITIVE, R.NEGATIVE, R.ZERO)
                if c not in (p.receptive_field, p.content)
            )
        out[name] = interval(cls, p.units)
    return out


ALL = [p.name for p in R.PREDICTIONS]


@pytest.mark.parametrize(
    "lo, hi, margin, expected",
    [
        (0.01, 0.04, 0.05, R.ZERO),  # excludes 0 but inside the margin
        (-0.05, 0.05, 0.05, R.ZERO),
        (0.01, 0.20, 0.05, R.POSITIVE),
        (-0.30, -0.06, 0.05, R.NEGATIVE),
        (-0.10, 0.10, 0.05, R.INCONCLUSIVE),
        (float("nan"), 0.1, 0.05, R.INCONCLUSIVE),
        (0.2, 0.1, 0.05, R.INCONCLUSIVE),
    ],
)
def test_classify(lo, hi, margin, expected):
    assert R.classify(lo, hi, margin) == expected


def test_every_test_separates_the_readings():
    for p in R.PREDICTIONS:
        assert p.receptive_field != p.content
    with pytest.raises(PropmapsError, match="cannot tell them apart"):
        R.Prediction("x", ("m",), "m", R.ZERO, R.ZERO, 0.05, "rate")


@pytest.mark.parametrize(
    "which, verdict",
    [
        ({n: R.RECEPTIVE_FIELD for n in ALL}, R.RECEPTIVE_FIELD),
        ({n: R.CONTENT for n in ALL}, R.CONTENT),
        (
            {
                "perm_network_vs_image": R.RECEPTIVE_FIELD,
                "perm_image_vs_random": R.RECEPTIVE_FIELD,
                "jpeg_vs_lossless": R.CONTENT,
            },
            R.BOTH,
        ),
        ({n: R.INCONCLUSIVE for n in ALL}, R.NEITHER),
        ({n: "neither" for n in ALL}, R.NEITHER),
        ({}, R.NEITHER),
        # One decided test is not enough to name a reading.
        ({"mlp_nearby_vs_random": R.CONTENT}, R.NEITHER),
        # Two for one reading, the rest inconclusive or matching neither.
        (
            {
                "mlp_nearby_vs_random": R.CONTENT,
                "jpeg_vs_lossless": R.CONTENT,
                "kernel_decay": R.INCONCLUSIVE,
                "perm_image_vs_random": "neither",
            },
            R.CONTENT,
        ),
    ],
)
def test_decide_reaches_every_outcome(which, verdict):
    decision = R.decide(measured_as(which))
    assert decision["verdict"] == verdict, decision["reason"]
    for row in decision["tests"]:
        if row["test"] in which:
            assert row["favours"] == which[row["test"]]
        else:
            assert row["favours"] == "not measured"


def test_each_test_favours_each_reading_on_its_own():
    for name in ALL:
        for target in (R.RECEPTIVE_FIELD, R.CONTENT, R.INCONCLUSIVE):
            row = R.decide(measured_as({name: target}))["tests"]
            assert next(r for r in row if r["test"] == name)["favours"] == target


def test_unknown_test_is_refused():
    with pytest.raises(PropmapsError, match="unknown readings test"):
        R.decide({"no_such_test": {"estimate": 0, "lo": 0, "hi": 0}})


def test_markdown_tables_name_every_test_and_the_verdict():
    table = R.predictions_markdown()
    decision = R.decide(measured_as({n: R.CONTENT for n in ALL}))
    text = R.verdict_markdown(decision)
    for p in R.PREDICTIONS:
        assert p.name in table and p.name in text
    assert "**Verdict: image content**" in text
    assert "pts" in text  # rates in percentage points
