"""Receptive field or image content: each reading's predictions and the deciding rule.

The paper reads its Table 1 (a successful one-pixel attack's colour still succeeds
at an adjacent pixel far more often than at a random one) as "the vulnerable unit is
a receptive field, not a pixel". A rival reading explains the same table without any
network geometry: natural images are smooth, so an adjacent pixel holds nearly the
same colour and surroundings as the attacked one (**image content**), and the same
colour put there does nearly the same thing whatever the network's receptive fields.

The two readings are pulled apart by models and data whose geometry and content can
be changed separately. This module states, before any of their numbers exist (it
was committed before the first of the new models was attacked; the history shows
it), what each reading predicts for each test, and the rule that turns measured
numbers into a verdict. `experiments/locality.py` computes the measures;
`decide` only reads them.

The tests (each a difference with a 95% interval bootstrapped over images, since
positions of one image are not independent samples):

- **perm_network_vs_image** (`lenet_perm`: the paper's LeNet trained on images
  whose pixel positions pass through one fixed permutation): the network-space
  nearby rate (the colour moved to an image position that the permutation puts
  next to the attacked pixel in the network's input) minus the image-space nearby
  rate. Receptive field: positive (network neighbours share receptive fields;
  image neighbours are scattered across the network's input). Content: negative
  (image neighbours hold similar content; network neighbours are random image
  positions).
- **perm_image_vs_random** (`lenet_perm`): image-space nearby minus random.
  Receptive field: zero (image neighbours are no closer in the network than random
  positions). Content: positive.
- **mlp_nearby_vs_random** (`mlp`: no convolution, no receptive-field geometry):
  nearby minus random. Receptive field: zero. Content: positive.
- **kernel_decay** (`lenet_k7` against `lenet_k3`: the same LeNet with 7x7 or 3x3
  first-layer kernels): the within-image distance slope (conditional logit of ring
  success on Chebyshev distance, image fixed effects) of `lenet_k7` minus that of
  `lenet_k3`. Receptive field: positive (a larger receptive field decays more
  slowly: a less negative slope). Content: zero (content decays with distance in
  the image, the same for every kernel).
- **colour_adjusted_distance** (`lenet`, the paper's LeNet): the within-image
  distance coefficient once the colour difference between the moved-to pixel's
  original value and the attacked pixel's original value is a covariate.
  Receptive field: negative (distance still matters at equal colour difference).
  Content: zero (distance adds little once the colour difference is in).
- **jpeg_vs_lossless** (the public Keras LeNet on the first 4,000 training images,
  each attacked as JPEG-decoded and as lossless): nearby rate on the JPEG copy
  minus on the lossless original, paired over the images attacked successfully in
  both. Content: positive (JPEG's 4:2:0 chroma and quantisation make neighbours
  more alike). Receptive field: zero (the network's geometry is the same).

An interval is classified as **zero** when it lies inside the test's equivalence
margin [-margin, +margin] (practically no effect, even if it excludes 0), else
**positive** when its lower end is above 0, **negative** when its upper end is
below 0, else **inconclusive** (too wide to say). A test favours the reading whose
prediction matches its class; a class that neither predicts (e.g. a negative
image-space nearby-minus-random) favours **neither** and says that both readings
failed there.

The overall verdict: **both** when each reading is favoured by at least one test
(each explains part of the locality); **receptive field** or **image content** when
at least `MIN_TESTS_TO_FAVOUR` tests favour that reading and none the other;
otherwise **neither** (fewer than `MIN_TESTS_TO_FAVOUR` decided tests: the rest
inconclusive, not measured, or matching neither prediction). Every outcome is
reachable; tests feed the rule made-up numbers for each.

The paper-reading check of `locality_controls.verdict` (nearby against random
across strata) stays as it was: it tests only that locality exists beyond image
fragility, which both readings predict, so it cannot tell them apart.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from propmaps_jax.analysis import content, within_image
from propmaps_jax.errors import PropmapsError

POSITIVE, NEGATIVE, ZERO, INCONCLUSIVE = "positive", "negative", "zero", "inconclusive"
RECEPTIVE_FIELD, CONTENT = "receptive field", "image content"
BOTH, NEITHER = "both", "neither"
# A reading is named only when at least this many tests favour it.
MIN_TESTS_TO_FAVOUR = 2
# Equivalence margins: a rate difference within 5 percentage points, or a distance
# coefficient within 0.10 log-odds per pixel of Chebyshev distance, is "no effect".
RATE_MARGIN = 0.05
SLOPE_MARGIN = 0.10


@dataclasses.dataclass(frozen=True)
class Prediction:
    """One test: what it measures and the class each reading predicts for it."""

    name: str
    models: tuple[str, ...]
    measure: str
    receptive_field: str
    content: str
    margin: float
    units: str

    def __post_init__(self) -> None:
        for reading in (self.receptive_field, self.content):
            if reading not in (POSITIVE, NEGATIVE, ZERO):
                raise PropmapsError(f"{self.name}: unknown predicted class {reading!r}")
        if self.receptive_field == self.content:
            raise PropmapsError(
                f"{self.name}: both readings predict {self.content!r}; a test that "
                "cannot tell them apart does not belong in the rule"
            )


PREDICTIONS: tuple[Prediction, ...] = (
    Prediction(
        "perm_network_vs_image",
        ("lenet_perm",),
        "network-space nearby rate - image-space nearby rate",
        POSITIVE,
        NEGATIVE,
        RATE_MARGIN,
        "rate",
    ),
    Prediction(
        "perm_image_vs_random",
        ("lenet_perm",),
        "image-space nearby rate - random rate",
        ZERO,
        POSITIVE,
        RATE_MARGIN,
        "rate",
    ),
    Prediction(
        "mlp_nearby_vs_random",
        ("mlp",),
        "nearby rate - random rate",
        ZERO,
        POSITIVE,
        RATE_MARGIN,
        "rate",
    ),
    Prediction(
        "kernel_decay",
        ("lenet_k7", "lenet_k3"),
        "within-image distance slope of lenet_k7 - that of lenet_k3",
        POSITIVE,
        ZERO,
        SLOPE_MARGIN,
        "log-odds per pixel",
    ),
    Prediction(
        "colour_adjusted_distance",
        ("lenet",),
        "within-image distance coefficient adjusted for the colour difference",
        NEGATIVE,
        ZERO,
        SLOPE_MARGIN,
        "log-odds per pixel",
    ),
    Prediction(
        "jpeg_vs_lossless",
        ("lenet (Keras lenet.h5)",),
        "nearby rate on JPEG - on lossless, same images (training images)",
        ZERO,
        POSITIVE,
        RATE_MARGIN,
        "rate",
    ),
)
PREDICTION_BY_NAME: dict[str, Prediction] = {p.name: p for p in PREDICTIONS}


def classify(lo: float, hi: float, margin: float) -> str:
    """The class of an interval [lo, hi]: zero, positive, negative or inconclusive."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
        return INCONCLUSIVE
    if -margin <= lo and hi <= margin:
        return ZERO
    if lo > 0:
        return POSITIVE
    if hi < 0:
        return NEGATIVE
    return INCONCLUSIVE


def favoured(prediction: Prediction, measured_class: str) -> str:
    """Which reading a test's measured class favours: one of them, neither, or
    inconclusive."""
    if measured_class == INCONCLUSIVE:
        return INCONCLUSIVE
    if measured_class == prediction.receptive_field:
        return RECEPTIVE_FIELD
    if measured_class == prediction.content:
        return CONTENT
    return NEITHER


def decide(measured: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The verdict from measured intervals `{test name: {"estimate", "lo", "hi"}}`.

    Tests missing from `measured` (a model not run yet) count as not measured and
    favour nothing. Returns the per-test rows (class, favoured reading) and the
    overall verdict with its reason.
    """
    unknown = sorted(set(measured) - set(PREDICTION_BY_NAME))
    if unknown:
        raise PropmapsError(
            f"unknown readings test(s) {', '.join(unknown)}; the tests are "
            + ", ".join(PREDICTION_BY_NAME)
        )
    rows = []
    for prediction in PREDICTIONS:
        value = measured.get(prediction.name)
        if value is None:
            rows.append(
                {
                    "test": prediction.name,
                    "measured": False,
                    "class": None,
                    "favours": "not measured",
                }
            )
            continue
        lo, hi = float(value["lo"]), float(value["hi"])
        measured_class = classify(lo, hi, prediction.margin)
        rows.append(
            {
                "test": prediction.name,
                "measured": True,
                "estimate": float(value["estimate"]),
                "lo": lo,
                "hi": hi,
                "class": measured_class,
                "favours": favoured(prediction, measured_class),
            }
        )
    count = {
        reading: sum(r["favours"] == reading for r in rows)
        for reading in (RECEPTIVE_FIELD, CONTENT, NEITHER, INCONCLUSIVE)
    }
    count["not measured"] = sum(not r["measured"] for r in rows)
    rf, ct = count[RECEPTIVE_FIELD], count[CONTENT]
    bar = MIN_TESTS_TO_FAVOUR
    if rf >= 1 and ct >= 1:
        verdict = BOTH
        reason = f"{rf} test(s) favour the receptive field and {ct} image content"
    elif rf >= bar:
        verdict = RECEPTIVE_FIELD
        reason = f"{rf} tests favour the receptive field, none image content"
    elif ct >= bar:
        verdict = CONTENT
        reason = f"{ct} tests favour image content, none the receptive field"
    else:
        verdict = NEITHER
        reason = (
            f"receptive field {rf}, image content {ct} (a reading needs {bar} "
            f"tests); {count[NEITHER]} matched neither prediction, "
            f"{count[INCONCLUSIVE]} were inconclusive, "
            f"{count['not measured']} not measured"
        )
    return {"verdict": verdict, "reason": reason, "counts": count, "tests": rows}


def _fmt(value: float, units: str) -> str:
    return f"{100 * value:+.1f} pts" if units == "rate" else f"{value:+.3f}"


def predictions_markdown() -> str:
    """The predictions table (as committed before the numbers) in Markdown."""
    lines = [
        "| test | models | measure | receptive field predicts | image content "
        "predicts | 'zero' means within |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for p in PREDICTIONS:
        margin = f"±{100 * p.margin:.0f} pts" if p.units == "rate" else f"±{p.margin}"
        lines.append(
            f"| {p.name} | {', '.join(p.models)} | {p.measure} | "
            f"{p.receptive_field} | {p.content} | {margin} |"
        )
    return "\n".join(lines)


def verdict_markdown(decision: Mapping[str, Any]) -> str:
    """The measured table beside the predictions, and the verdict, in Markdown."""
    lines = [
        "| test | receptive field predicts | content predicts | measured (95% CI, "
        "bootstrap over images) | class | favours |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in decision["tests"]:
        p = PREDICTION_BY_NAME[row["test"]]
        if row["measured"]:
            value = (
                f"{_fmt(row['estimate'], p.units)} "
                f"({_fmt(row['lo'], p.units)} to {_fmt(row['hi'], p.units)})"
            )
        else:
            value = "not measured"
        lines.append(
            f"| {p.name} | {p.receptive_field} | {p.content} | {value} | "
            f"{row['class'] or '-'} | {row['favours']} |"
        )
    lines.append("")
    lines.append(f"**Verdict: {decision['verdict']}** ({decision['reason']}).")
    return "\n".join(lines)


# The measures. Each takes the arrays of the runs it compares and returns
# {"estimate", "lo", "hi"} with a 95% interval from a bootstrap over images.
MEASURE_RESAMPLES = 2000
SLOPE_RESAMPLES = 200


def paired_difference(
    first: Any, second: Any, clusters: Any, seed: int = 0
) -> dict[str, float | None]:
    """rate(first) - rate(second) of two moves of the same attacks, bootstrapped
    over images (perm_network_vs_image, perm_image_vs_random, mlp_nearby_vs_random)."""
    return content.interval_dict(
        within_image.rate_difference(first, second, clusters, MEASURE_RESAMPLES, seed)
    )


def encoding_difference(
    jpeg_index: Any,
    jpeg_nearby: Any,
    lossless_index: Any,
    lossless_nearby: Any,
    seed: int = 0,
) -> dict[str, Any]:
    """jpeg_vs_lossless: the nearby rate on the JPEG copy minus on the lossless
    original, over the images attacked successfully under both encodings (paired
    by image index), bootstrapped over those images."""
    jpeg_index, lossless_index = np.asarray(jpeg_index), np.asarray(lossless_index)
    common, in_jpeg, in_lossless = np.intersect1d(
        jpeg_index, lossless_index, return_indices=True
    )
    out = content.interval_dict(
        within_image.rate_difference(
            np.asarray(jpeg_nearby, bool)[in_jpeg],
            np.asarray(lossless_nearby, bool)[in_lossless],
            common,
            MEASURE_RESAMPLES,
            seed,
        )
    )
    out["images_in_both"] = int(len(common))
    return out


def _stacked(runs: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Rows of several runs in one table: run number, test image, stratum id."""
    parts = {"run": [], "image": [], "stratum": [], "distance": [], "success": []}
    offset = 0
    for r, rows in enumerate(runs):
        attack = np.asarray(rows["attack"], np.int64)
        parts["run"].append(np.full(len(attack), r))
        parts["image"].append(np.asarray(rows["image"], np.int64)[attack])
        parts["stratum"].append(attack + offset)
        parts["distance"].append(np.asarray(rows["distance"], np.float64))
        parts["success"].append(np.asarray(rows["success"], bool))
        offset += int(attack.max()) + 1 if len(attack) else 0
    return {k: np.concatenate(v) for k, v in parts.items()}


def slope_difference(
    first: Mapping[str, np.ndarray],
    second: Mapping[str, np.ndarray],
    seed: int = 0,
    num_resamples: int = SLOPE_RESAMPLES,
) -> dict[str, float | None]:
    """kernel_decay: within-image distance slope of `first` minus `second`.

    Each of `first`/`second` holds ring rows (`content.ring_rows`: attack,
    distance, success) and `image` (the test image of each attack). The two models
    attacked the same test images, so the bootstrap draws test images and refits
    both models on the drawn images' attacks (conditional logit, one stratum per
    drawn copy of an attack).
    """
    table = _stacked([first, second])

    def statistic(sample: np.ndarray) -> float:
        strata = within_image.resampled_strata(sample, table["stratum"])
        slopes = []
        for r in (0, 1):
            mine = table["run"][sample] == r
            fit = within_image.conditional_logit(
                table["success"][sample][mine],
                table["distance"][sample][mine][:, None],
                strata[mine],
            )
            slopes.append(fit["coef"][0] if fit["converged"] else math.nan)
        return slopes[0] - slopes[1]

    return content.interval_dict(
        within_image.cluster_bootstrap(statistic, table["image"], num_resamples, seed)
    )


def nearby_rate_comparison(
    runs: Mapping[str, tuple[np.ndarray, np.ndarray]], seed: int = 0
) -> dict[str, Any]:
    """The paper's "the nearby rate is about the same across networks" as numbers.

    `runs`: {label: (test image index of each successful attack, nearby success)}
    of runs on the same test images. Each model's nearby rate and each pair's
    difference, with 95% intervals from one bootstrap over test images (a drawn
    image brings every model's attack on it).
    """
    labels = list(runs)
    images = np.concatenate([np.asarray(runs[k][0]) for k in labels])
    success = np.concatenate([np.asarray(runs[k][1], bool) for k in labels])
    run = np.concatenate([np.full(len(runs[k][0]), i) for i, k in enumerate(labels)])
    pairs = [(a, b) for i, a in enumerate(labels) for b in labels[i + 1 :]]

    def statistic(sample: np.ndarray) -> np.ndarray:
        rates = [
            success[sample][run[sample] == i].mean()
            if np.any(run[sample] == i)
            else math.nan
            for i in range(len(labels))
        ]
        diffs = [rates[labels.index(a)] - rates[labels.index(b)] for a, b in pairs]
        return np.asarray(rates + diffs, np.float64)

    boot = within_image.cluster_bootstrap(statistic, images, MEASURE_RESAMPLES, seed)
    values = [
        content.interval_dict({"estimate": e, "lo": lo, "hi": hi})
        for e, lo, hi in zip(boot["estimate"], boot["lo"], boot["hi"], strict=True)
    ]
    out: dict[str, Any] = {"rates": {}, "differences": {}}
    for i, label in enumerate(labels):
        out["rates"][label] = {**values[i], "n": int((run == i).sum())}
    for j, (a, b) in enumerate(pairs):
        diff = values[len(labels) + j]
        diff["class"] = classify(
            diff["lo"] if diff["lo"] is not None else math.nan,
            diff["hi"] if diff["hi"] is not None else math.nan,
            RATE_MARGIN,
        )
        out["differences"][f"{a} - {b}"] = diff
    return out
