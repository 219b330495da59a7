"""The salience study's statistics (paper, section 8): the conflicting salience
hypothesis as three predictions with bootstrap intervals and a fixed verdict rule.

`saliency.analyse_changes` measures, per attacked image, three changes (the
attack's pixel, the same colour nearby and at a random pixel): attention capture,
saliency disturbance and the last convolution's propagation map. Here those
per-change measures become the verdict table: P1 (capture rises more after
successful attacks, and than at a random pixel), P2 (disturbance predicts a class
change: ROC AUC), P3 (propagation maps and disturbance agree: Spearman), each row
with its bootstrap interval over images and the verdict of `verdict`; the group
means (`group_summary`) and the table as markdown (`table_markdown`). NumPy,
vectorised; the random draws come from the caller's generator, in a fixed order.

`study_attacks` is the whole study of a set of attacks in one call: the maps and
measures on the device, batched, then the table, the ROC curves, the group means
and the maps of a few examples (`SalienceStudy`); its keys and its bootstrap
generator come from one seed, so that its numbers depend on nothing else.
`attack_predictions` gives what a model predicts before and after each attack,
to check that a stored attack run is this model's.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from propmaps_jax import batching, models, stats
from propmaps_jax.analysis import locality, saliency
from propmaps_jax.analysis.saliency import CHANGES, WINDOWS, SaliencyConfig
from propmaps_jax.attack.perturb import apply_pixels_batch
from propmaps_jax.types import ApplyFn, FeaturesFn, Variables

# Groups of changes: the attack's pixel of successful / failed attacks, and the
# moves of successful attacks (the locality protocol).
GROUPS = ("successful", "failed", "nearby", "random")
CLASSES = ("true", "new")
# Verdict rule: (value of no effect, smallest effect that matters) per statistic.
NO_EFFECT = {"capture": 0.0, "auc": 0.5, "spearman": 0.0}
MEANINGFUL = {"capture": 0.01, "auc": 0.6, "spearman": 0.1}
# Fewer items than this in a row: a bootstrap interval is not trusted.
MIN_N = 10
# fold_in streams of the study's seed: the per-image saliency keys, the bootstrap.
SALIENCE_STREAM = 0x5A1
BOOTSTRAP_STREAM = 0xB007
MEASURES = {
    "spearman": "1 - Spearman correlation of the maps",
    "top5": "1 - overlap of the top-5% pixels",
}


def verdict(estimate: float, low: float, high: float, kind: str, n: int) -> str:
    """The caption's rule: 'supported', 'not supported' or 'inconclusive'."""
    if n < MIN_N or not all(math.isfinite(v) for v in (estimate, low, high)):
        return "inconclusive"
    if high < MEANINGFUL[kind]:
        return "not supported"
    if low > NO_EFFECT[kind]:
        return "supported"
    return "inconclusive"


def _row(pid, prediction, cls, measure, kind, n, estimate, replicates) -> dict:
    low, high = stats.percentile_interval(replicates)
    return {
        "id": pid,
        "prediction": prediction,
        "class": cls,
        "measure": measure,
        "n": int(n),
        "estimate": float(estimate),
        "ci_low": low,
        "ci_high": high,
        "no_effect": NO_EFFECT[kind],
        "meaningful": MEANINGFUL[kind],
        "verdict": verdict(float(estimate), low, high, kind, int(n)),
    }


def capture_rise(results: dict[str, np.ndarray], cls: str, size: int) -> np.ndarray:
    """Saliency share in the window after minus before, per change (N, 3)."""
    return (
        results[f"{cls}_capture{size}_after"] - results[f"{cls}_capture{size}_before"]
    )


def disturbance(results: dict[str, np.ndarray], cls: str, measure: str) -> np.ndarray:
    """1 - Spearman or 1 - top-5% overlap of the maps before/after, per change."""
    name = "spearman" if measure == "spearman" else "top5"
    return 1.0 - results[f"{cls}_{name}"]


def group_values(values: np.ndarray, success: np.ndarray) -> dict[str, np.ndarray]:
    """Per-change values (N, 3) split into GROUPS (nearby/random: successes only)."""
    return {
        "successful": values[success, 0],
        "failed": values[~success, 0],
        "nearby": values[success, 1],
        "random": values[success, 2],
    }


def _no_interval(resamples: int) -> tuple[np.ndarray, float]:
    return np.full(resamples, np.nan), math.nan


def p1_rows(results, success, rng, resamples) -> list[dict]:
    """P1: the rise of the 3x3 capture, successful vs failed and vs random moves."""
    rows = []
    n_succ, n_fail = int(success.sum()), int((~success).sum())
    for cls in CLASSES:
        rise = capture_rise(results, cls, 3)
        succ, fail = rise[success, 0], rise[~success, 0]
        reps, estimate = _no_interval(resamples)
        if n_succ and n_fail:
            reps = rng.choice(succ, (resamples, n_succ)).mean(1) - rng.choice(
                fail, (resamples, n_fail)
            ).mean(1)
            estimate = succ.mean() - fail.mean()
        rows.append(
            _row(
                "P1a",
                "capture rises more after successful than after failed attacks",
                cls,
                "difference of mean rise of the 3x3 share",
                "capture",
                n_succ + n_fail,
                estimate,
                reps,
            )
        )
        paired = rise[success, 0] - rise[success, 2]
        reps, estimate = _no_interval(resamples)
        if n_succ:
            reps = rng.choice(paired, (resamples, n_succ)).mean(1)
            estimate = paired.mean()
        rows.append(
            _row(
                "P1b",
                "capture rises more for the attack's pixel than for the same colour "
                "at a random pixel (successful attacks, paired)",
                cls,
                "mean paired difference of the rise of the 3x3 share",
                "capture",
                n_succ,
                estimate,
                reps,
            )
        )
    return rows


def p2_rows(results, labels, rng, resamples) -> tuple[list[dict], dict]:
    """P2: ROC AUC of each disturbance as a detector of a class change, and curves.

    Every change of every attacked image counts; the bootstrap resamples images
    with all their changes; changes with an undefined disturbance are left out.
    """
    rows, roc = [], {}
    changed = (results["pred_after"] != labels[:, None]).reshape(-1)
    n = len(labels)
    counts = rng.multinomial(n, np.full(n, 1.0 / n), size=resamples)
    for cls in CLASSES:
        for measure in MEASURES:
            scores = disturbance(results, cls, measure).reshape(-1)
            finite = np.isfinite(scores)
            scores = np.where(finite, scores, 0.0)
            estimate = stats.weighted_auc(scores, changed, finite[None].astype(float))[
                0
            ]
            reps = stats.weighted_auc(
                scores, changed, np.repeat(counts, len(CHANGES), axis=1) * finite
            )
            rows.append(
                _row(
                    "P2",
                    "saliency disturbance predicts a class change (all changes)",
                    cls,
                    f"ROC AUC of {MEASURES[measure]}",
                    "auc",
                    int(finite.sum()),
                    estimate,
                    reps,
                )
            )
            fpr, tpr = stats.roc_curve(scores[finite], changed[finite])
            roc[(cls, measure)] = {"fpr": fpr, "tpr": tpr, "row": rows[-1]}
    return rows, roc


def p3_rows(results, success, rng, resamples) -> list[dict]:
    """P3: Spearman of last-layer PM max and saliency disturbance, per group."""
    rows = []
    pm = group_values(results["pm_last_max"], success)
    dist = group_values(disturbance(results, "true", "spearman"), success)
    for group in GROUPS:
        x, y = pm[group], dist[group]
        keep = np.isfinite(x) & np.isfinite(y)
        x, y = x[keep], y[keep]
        reps, estimate = _no_interval(resamples)
        if x.size >= 3:
            estimate = stats.spearman(x, y)
            idx = rng.integers(0, x.size, (resamples, x.size))
            reps = stats.spearman(x[idx], y[idx])
        rows.append(
            _row(
                "P3",
                f"propagation maps and saliency agree ({group})",
                "true",
                "Spearman of last-layer PM max and 1 - Spearman of the maps",
                "spearman",
                x.size,
                estimate,
                reps,
            )
        )
    return rows


def group_summary(
    results: dict[str, np.ndarray],
    success: np.ndarray,
    rng: np.random.Generator,
    resamples: int,
) -> dict[str, Any]:
    """Mean and bootstrap interval of every measure per group of changes."""
    measures = {"pm_last_max": results["pm_last_max"]}
    measures["pm_last_mean"] = results["pm_last_mean"]
    for cls in CLASSES:
        for size in WINDOWS:
            for when in ("before", "after"):
                name = f"{cls}_capture{size}_{when}"
                measures[name] = results[name]
            measures[f"{cls}_capture{size}_rise"] = capture_rise(results, cls, size)
        for measure in MEASURES:
            measures[f"{cls}_disturbance_{measure}"] = disturbance(
                results, cls, measure
            )
    out: dict[str, Any] = {}
    for group in GROUPS:
        out[group] = {}
        for name, values in measures.items():
            v = group_values(values, success)[group]
            v = v[np.isfinite(v)]
            if v.size == 0:
                out[group][name] = {"n": 0, "mean": None, "ci_low": None}
                out[group][name]["ci_high"] = None
                continue
            low, high = stats.percentile_interval(
                rng.choice(v, (resamples, v.size)).mean(1)
            )
            out[group][name] = {
                "n": int(v.size),
                "mean": float(v.mean()),
                "ci_low": _finite_or_none(low),
                "ci_high": _finite_or_none(high),
            }
    return out


def _finite_or_none(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _fmt(value: float, kind: str) -> str:
    if not math.isfinite(value):
        return "n/a"
    return f"{100 * value:+.2f} pp" if kind == "capture" else f"{value:.3f}"


def table_markdown(rows: list[dict], settings: dict) -> str:
    """DIR/salience/table.md: the verdict table and its rule in the caption."""
    lines = [
        f"Conflicting salience hypothesis (paper, section 8): {settings['model']}, "
        f"{settings['attacks']} attacked images ({settings['successful']} "
        f"successful), saliency `{settings['saliency']['method']}` of the class "
        f"{settings['saliency']['score']}; 95% bootstrap intervals over images "
        f"({settings['bootstrap']} resamples, seed {settings['seed']}).",
        "",
        "| id | prediction | class | measure | n | estimate | 95% CI | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        kind = "capture" if r["id"].startswith("P1") else "other"
        lines.append(
            f"| {r['id']} | {r['prediction']} | {r['class']} | {r['measure']} | "
            f"{r['n']} | {_fmt(r['estimate'], kind)} | "
            f"{_fmt(r['ci_low'], kind)} to {_fmt(r['ci_high'], kind)} | "
            f"**{r['verdict']}** |"
        )
    lines += [
        "",
        "Rule (applied by the code, never by hand): a row is *not supported* when the "
        "whole interval lies below the smallest effect that matters (P1: "
        f"+{100 * MEANINGFUL['capture']:g} percentage point of saliency mass, P2: AUC "
        f"{MEANINGFUL['auc']:g}, P3: Spearman {MEANINGFUL['spearman']:g}); "
        "otherwise *supported* when the whole interval lies above no effect "
        f"(P1: {NO_EFFECT['capture']:g}, P2: AUC {NO_EFFECT['auc']:g}, P3: "
        f"{NO_EFFECT['spearman']:g}); otherwise *inconclusive*, as also when an "
        f"interval cannot be computed or fewer than {MIN_N} items (n) enter the "
        "row. Class *true*: saliency of the true class "
        "before and after the change; *new*: of the class predicted after the "
        "change (the true class when it did not change). Capture: share of the "
        "saliency mass in the 3x3 window of the changed pixel, after minus before "
        "(pp: percentage points; a uniform map puts 0.88 pp there). Nearby and "
        "random moves are of successful attacks (locality protocol); P2 uses "
        "every change of every attacked image and resamples images with their "
        "changes.",
        "",
    ]
    return "\n".join(lines)


def saliency_settings(config: SaliencyConfig) -> dict[str, Any]:
    """The saliency method's settings as summary.json records them."""
    out = {"method": config.method, "score": config.score}
    if config.method == "integrated_gradients":
        out["steps"] = config.steps
    if config.method == "smoothgrad":
        out["samples"], out["sigma"] = config.samples, config.sigma
    return out


def json_safe(obj: Any) -> Any:
    """`obj` with string keys and every non-finite float as None."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def default_batch_size(config: SaliencyConfig) -> int:
    """Attacks per jitted step: as many as fit 128 forward passes, at most 64."""
    return max(1, min(64, 128 // config.passes))


def attack_predictions(
    apply_fn: ApplyFn, variables: Variables, images: np.ndarray, pixels: np.ndarray
) -> np.ndarray:
    """(2, N) predicted classes of the clean `images` (N, H, W, C) and of them
    perturbed by `pixels` (N, k, 5): an attack run's pred_before and pred_after
    when it is this model's."""
    check = jax.jit(
        lambda v, x, p: (
            jnp.argmax(
                apply_fn(
                    v,
                    jnp.concatenate([x, apply_pixels_batch(x, p)]).astype(jnp.float32),
                ),
                axis=-1,
            )
            .reshape(2, -1)
            .T
        )
    )
    return batching.map_batches(
        functools.partial(check, variables), [images, pixels], 256
    ).T


@dataclasses.dataclass(frozen=True)
class SalienceStudy:
    """The salience study of N attacks (`study_attacks`).

    The inputs: test `indices`, `images`, `labels`, `success` (N,), `changes` (N,
    3, 5); `last_layer` and its `last_shape` (H, W, K), the layer of the
    propagation-map measures; `results`: `saliency.analyse_changes`' measures per
    change, (N,) or (N, 3); `rows`: the verdict table (P1, P2, P3); `roc`: the
    ROC curves of P2 {(class, measure): {"fpr", "tpr", "row"}}; `groups`:
    `group_summary`; `chosen`: the attacks shown as examples (first successful,
    then failed), `example_maps` their maps (None when none is shown).
    """

    indices: np.ndarray
    images: np.ndarray
    labels: np.ndarray
    success: np.ndarray
    changes: np.ndarray
    last_layer: str
    last_shape: tuple[int, ...]
    results: dict[str, np.ndarray]
    rows: list[dict]
    roc: dict
    groups: dict[str, Any]
    chosen: np.ndarray
    example_maps: dict[str, np.ndarray] | None

    def class_changed(self) -> dict[str, int]:
        """{change: how many of the N changes changed the predicted class}."""
        return {
            change: int(np.sum(self.results["pred_after"][:, j] != self.labels))
            for j, change in enumerate(CHANGES)
        }

    def capture(self) -> dict[str, dict[str, dict[str, np.ndarray]]]:
        """{class: {group: {"before", "after": the 3x3 capture of each change}}}."""
        return {
            cls: {
                group: {
                    when: group_values(
                        self.results[f"{cls}_capture3_{when}"], self.success
                    )[group]
                    for when in ("before", "after")
                }
                for group in GROUPS
            }
            for cls in CLASSES
        }


def study_attacks(
    features_fn: FeaturesFn,
    variables: Variables,
    indices: np.ndarray,
    images: np.ndarray,
    labels: np.ndarray,
    changes: np.ndarray,
    success: np.ndarray,
    config: SaliencyConfig | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    resamples: int = 2000,
    examples: int = 3,
    on_batch: Callable[[int], Any] | None = None,
) -> SalienceStudy:
    """The salience study of N attacks of the model `features_fn`
    (`models.contract`; the paper's: `models.linen_features(module)`, the
    convolution outputs) on the clean test `images` (N, H, W, C)
    with test `indices` and true `labels` (N,): the three `changes` (N, 3, 5) of
    each (`saliency.change_positions`), `success` (N,) of the attack; `config`
    the saliency maps' (default `SaliencyConfig()`).

    Keys: `fold_in(key(seed), SALIENCE_STREAM)` then per test index; the
    bootstrap (`resamples`) draws from `default_rng([seed, BOOTSTRAP_STREAM])`.
    `batch_size` attacks per jitted step (None: `default_batch_size`);
    `on_batch(done)` after each; `examples`: how many successful and failed
    attacks keep their maps for a figure.
    """
    config = config or SaliencyConfig()
    if batch_size is None:
        batch_size = default_batch_size(config)
    # The model's last layer (the linen adapter's default: the last convolution's
    # output, for ResNets the last block's second conv, before the residual add).
    shapes = models.check_model(features_fn, variables, images.shape[1:])
    last_layer = list(shapes)[-1]
    analyse = jax.jit(
        functools.partial(saliency.analyse_changes, config, features_fn, last_layer),
        static_argnames="return_maps",
    )
    base = jax.random.fold_in(jax.random.key(seed), SALIENCE_STREAM)
    keys = locality.image_keys(base, indices)
    results = batching.map_batches(
        functools.partial(analyse, variables),
        [images, labels, changes, keys],
        batch_size,
        on_batch=on_batch,
    )

    rng = np.random.default_rng([seed, BOOTSTRAP_STREAM])
    rows = p1_rows(results, success, rng, resamples)
    p2, roc = p2_rows(results, labels, rng, resamples)
    rows += p2 + p3_rows(results, success, rng, resamples)
    groups = group_summary(results, success, rng, resamples)

    # Example maps for the figure: the first successful and failed attacks.
    chosen = np.concatenate(
        [np.flatnonzero(success)[:examples], np.flatnonzero(~success)[:examples]]
    )
    example_maps = None
    if chosen.size:
        example_maps = jax.device_get(
            analyse(
                variables,
                images[chosen],
                labels[chosen],
                changes[chosen],
                keys[chosen],
                return_maps=True,
            )
        )
    return SalienceStudy(
        indices,
        images,
        labels,
        success,
        changes,
        last_layer,
        tuple(shapes[last_layer]),
        results,
        rows,
        roc,
        groups,
        chosen,
        example_maps,
    )
