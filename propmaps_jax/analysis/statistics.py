"""Propagation maps over many attacks (paper section 6): the statistics streams.

The statistics experiment reads every attacked image of a run and asks what the
paper's figures 7-9 and its sentences about them say. The computing part lives
here, so that a user of the package re-runs it on any attack result:

- `attacked_rows`: the attacked rows of an attack table (a failed attack
  contributes its best candidate);
- `stream_statistics`: every attack through one jitted step that adds the
  propagation maps to running sums on the device (only per-image scalars come
  back to the host); the step takes the variables as an argument;
- `control_statistics`: the same sums with the attacks' colours put at other
  positions (uniform, and at each attack's own distance from the centre);
- `generation0_best_candidates`: each attack's initial population recomputed from
  the run's seed and settings (`generation0_problem` says why it cannot be);
- `mean_maps`, `per_layer_rows`, `claims_report`: the mean maps per outcome, the
  rows of per_layer.csv and the claims report (`claims_markdown.claims_table`
  renders it);
- `study_attacks`: all of it in one call, a `StatisticsStudy` (what the
  experiment's files hold: `figures.propagation.study_figures` draws it,
  `results.statistics_json.summary` is its summary.json).

Arrays in, arrays and dicts out; the run directory, the cache of the generation-0
file and the reports are the shell's (experiments/statistics.py).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from propmaps_jax import batching, models, stats
from propmaps_jax.analysis import claims, propagation
from propmaps_jax.attack import de as attack_de
from propmaps_jax.attack.perturb import apply_pixels_batch
from propmaps_jax.errors import PropmapsError
from propmaps_jax.results.attack_csv import require_predictions_match
from propmaps_jax.types import ApplyFn, FeaturesFn, Variables

OUTCOMES = ("successful", "failed", "all")
# fold_in constant of the control positions' key (apart from the attack's keys).
CONTROL_STREAM = 1_000_003
# Images per batch of the generation-0 recomputation (each: a population).
GENERATION0_CANDIDATES_PER_BATCH = 2048
# The columns of an attack table that the statistics read.
ATTACK_COLUMNS = (
    "index",
    "label",
    "pixels",
    "success",
    "pred_after",
    "generations",
    "prob_true_before",
    "prob_true_after",
)

# progress(total, what) -> on_batch(items done[, successes so far]): progress lines.
Progress = Callable[[int, str], Callable[..., None]]


def attacked_rows(table: dict[str, np.ndarray], source: str) -> dict[str, Any]:
    """The attacked rows of an attack table (`ATTACK_COLUMNS`), and the number of
    rows that were not attacked (`not_attacked`); `source` names the table in the
    error raised when nothing was attacked."""
    attacked = np.flatnonzero(table["attacked"])
    if attacked.size == 0:
        raise PropmapsError(
            f"{source} holds no attacked image (all were misclassified before "
            "the attack or it is empty): attack more images first"
        )
    rows: dict[str, Any] = {k: table[k][attacked] for k in ATTACK_COLUMNS}
    rows["not_attacked"] = int(table["index"].size - attacked.size)
    return rows


def _no_progress(total: int, what: str) -> Callable[..., None]:
    del total, what
    return lambda done, successes=None: None


def outcome_masks(success: np.ndarray) -> dict[str, np.ndarray]:
    """{outcome of `OUTCOMES`: which attacks it holds} of the attacks' `success`."""
    return {"successful": success, "failed": ~success, "all": np.ones_like(success)}


def stream_statistics(
    features_fn: FeaturesFn,
    variables: Variables,
    shapes: dict[str, tuple[int, ...]],
    images: np.ndarray,
    rows: dict[str, Any],
    batch_size: int,
    signed: bool,
    progress: Progress = _no_progress,
) -> tuple[dict[str, Any], dict[str, np.ndarray], np.ndarray]:
    """(running sums, per-image scalars {name: (N, L)}, predictions after) of every
    attack of `rows` on the clean test `images`, in batches through one jitted step
    (the sums stay on the device); `features_fn` is the model (`models.contract`),
    `shapes` its `models.check_model`."""
    order = list(shapes)

    def step(state, v, batch_images, batch_pixels, batch_success, valid):
        perturbed = apply_pixels_batch(batch_images, batch_pixels)
        return propagation.accumulate_statistics(
            state,
            features_fn,
            v,
            batch_images,
            perturbed,
            batch_success,
            valid,
            signed,
        )

    step = jax.jit(step, donate_argnums=0)
    state = propagation.init_statistics(shapes)
    indices, pixels, success = rows["index"], rows["pixels"], rows["success"]
    total = indices.size
    scalars = {
        name: np.empty((total, len(order)), np.float64)
        for name in propagation.SUMMARY_NAMES
    }
    predicted = np.empty((total,), np.int64)
    on_batch = progress(total, "attacks")
    for batch in batching.batches(total, batch_size):
        # The padding rows are masked out of the sums (`valid`).
        take, valid, begin, end = batch.take, batch.valid, batch.start, batch.end
        state, out = step(
            state,
            variables,
            jnp.asarray(images[indices[take]]),
            jnp.asarray(pixels[take]),
            jnp.asarray(success[take]),
            jnp.asarray(valid),
        )
        out = jax.device_get(out)
        count = end - begin
        for name in propagation.SUMMARY_NAMES:
            scalars[name][begin:end] = np.stack(
                [out["summaries"][layer][name][:count] for layer in order], axis=1
            )
        predicted[begin:end] = np.argmax(out["logits_adv"][:count], axis=-1)
        on_batch(end, int(success[:end].sum()))
    return jax.device_get(state), scalars, predicted


def control_statistics(
    features_fn: FeaturesFn,
    variables: Variables,
    shapes: dict[str, tuple[int, ...]],
    images: np.ndarray,
    rows: dict[str, Any],
    batch_size: int,
    seed: int,
    signed: bool,
    progress: Progress = _no_progress,
) -> dict[str, dict[str, Any]]:
    """{"uniform_positions", "distance_matched"}: running sums of the one-pixel
    attacks' colours put at other positions (one per test image, from `seed`),
    outcomes kept: drawn uniformly, and drawn at each attack's own distance from
    the centre (`claims.distance_matched_positions`)."""
    height, width = images.shape[1:3]
    key = jax.random.fold_in(jax.random.key(seed), CONTROL_STREAM)
    found = rows["pixels"][:, 0, :2]
    draws = {
        "uniform_positions": claims.uniform_positions(
            key, rows["index"], height, width
        ),
        "distance_matched": claims.distance_matched_positions(
            jax.random.fold_in(key, 1), rows["index"], found, height, width
        ),
    }
    states = {}
    for name, positions in draws.items():
        moved = rows["pixels"].copy()
        moved[:, 0, :2] = positions
        states[name], _, _ = stream_statistics(
            features_fn,
            variables,
            shapes,
            images,
            {**rows, "pixels": moved},
            batch_size,
            signed,
            progress,
        )
    return states


def generation0_problem(settings: dict[str, Any]) -> str | None:
    """Why the initial populations of a run with attack `settings` (its
    attack_summary.json's) cannot be recomputed, or None when they can."""
    if not settings:
        return "no attack_summary.json beside attack.csv: seed and settings unknown"
    if settings.get("target") is not None:
        return "a targeted attack (the comparison is for untargeted runs)"
    needed = ("seed", "pixels", "population", "generations")
    missing = [k for k in needed if k not in settings]
    if missing:
        return f"attack_summary.json does not record {', '.join(missing)}"
    return None


def generation0_record(settings: dict[str, Any]) -> str:
    """The attack settings as the text that identifies a generation-0 result."""
    return json.dumps(settings, sort_keys=True)


def generation0_best_candidates(
    apply_fn: ApplyFn,
    variables: Variables,
    images: np.ndarray,
    rows: dict[str, Any],
    settings: dict[str, Any],
    progress: Progress = _no_progress,
) -> dict[str, np.ndarray]:
    """{"best", "reported": pixels (N, k, 5), "success": (N,)} of every attack's
    initial population, recomputed from the run's seed and `settings` (see
    `claims.generation0_best`; check `generation0_problem` first); `apply_fn` is
    the attack's (e.g. `models.make_apply_fn(module)`)."""
    config = attack_de.AttackConfig(
        **{
            k: settings[k]
            for k in (
                "pixels",
                "population",
                "generations",
                "differential_weight",
                "crossover_rate",
            )
            if k in settings
        }
    )
    key = jax.random.key(int(settings["seed"]))

    def one(index, v, image, label):
        return claims.generation0_best(
            attack_de.image_key(key, index), apply_fn, v, image, label, config
        )

    best_of = jax.jit(jax.vmap(one, in_axes=(0, None, 0, 0)))
    per_batch = max(1, GENERATION0_CANDIDATES_PER_BATCH // config.population)
    indices, total = rows["index"], rows["index"].size
    return batching.map_batches(
        lambda index, image, label: best_of(
            jnp.asarray(index, jnp.int32),
            variables,
            jnp.asarray(image),
            jnp.asarray(label, jnp.int32),
        ),
        [indices, images[indices], rows["label"]],
        per_batch,
        on_batch=progress(total, "initial populations"),
    )


def mean_maps(state, counts: dict[str, int], order: list[str]) -> dict:
    """{"pm_avg/successful": {layer: (H, W)}, ...}: the mean maps per outcome."""
    # Outcome index 0 = failed, 1 = successful (see init_statistics).
    maps = {}
    for outcome, slot in (("failed", 0), ("successful", 1)):
        n = max(counts[outcome], 1)
        for reduce in ("avg", "max"):
            maps[f"pm_{reduce}/{outcome}"] = {
                layer: state[f"pm_{reduce}_sum"][layer][slot] / n for layer in order
            }
    return maps


def per_layer_rows(
    shapes: dict[str, tuple[int, ...]],
    layer_stats: dict[str, dict[str, np.ndarray]],
    masks: dict[str, np.ndarray],
) -> tuple[list[str], list[list[Any]]]:
    """(header, rows) of per_layer.csv: per layer and outcome its shape, the number
    of attacks and every per-layer statistic (`propagation.per_outcome_layer_stats`)."""
    header = ["layer", "height", "width", "channels", "outcome", "attacks"] + list(
        layer_stats["all"]
    )
    csv_rows = []
    for j, layer in enumerate(shapes):
        for outcome in OUTCOMES:
            n = int(masks[outcome].sum())
            csv_rows.append(
                [layer, *shapes[layer], outcome, n]
                + [f"{layer_stats[outcome][s][j]:.6g}" for s in layer_stats[outcome]]
            )
    return header, csv_rows


def claims_report(
    rows: dict[str, Any],
    scalars: dict[str, np.ndarray],
    order: list[str],
    maps: dict,
    control_maps: dict[str, dict],
    generation0: dict[str, np.ndarray] | str,
    shape: tuple[int, int],
    signed: bool,
    layers: str,
) -> dict[str, Any]:
    """The paper's sentences read as the paper means them, each a
    `claims.claim_record`, with the maps, layers and counts they are of (the
    contents of claims.json without its schema and provenance).

    `maps`, `control_maps`: `mean_maps` of the attacks and of each control;
    `generation0`: `generation0_best_candidates`, or why it was not computed.
    """
    height, width = shape
    success = rows["success"]
    last = len(order) - 1
    results = {
        "close_to_max": claims.claim_close_to_max(scalars["max_ratio"], success, order),
        "same_across_layers": claims.claim_same_across_layers(scalars, success),
    }
    best0 = None if isinstance(generation0, str) else generation0["best"]
    results["failed_farther_from_centre"] = claims.claim_failed_farther(
        rows["pixels"], success, height, width, best0
    )
    if isinstance(generation0, str):
        results["failed_farther_from_centre"]["secondary"]["generation0"] = {
            "not_computed": generation0
        }
    else:
        at0 = success & (rows["generations"] == 0)
        same_pixel = np.all(generation0["reported"][at0] == rows["pixels"][at0], (1, 2))
        results["failed_farther_from_centre"]["secondary"]["generation0"]["check"] = {
            "succeeded_at_generation0": int(at0.sum()),
            "recorded_pixel_recomputed": int(same_pixel.sum()),
        }
    results["quarter_of_last_map"] = claims.claim_quarter(
        scalars["spread_strong"][:, last], scalars["spread"][:, last], success
    )
    top = order[last]
    outcomes = [
        o for o in ("successful", "failed") if (success == (o == "successful")).any()
    ]
    last_maps = {"attacks": {o: maps[f"pm_avg/{o}"][top] for o in outcomes}}
    for name, control in control_maps.items():
        last_maps[name] = {o: control[f"pm_avg/{o}"][top] for o in outcomes}
    if "successful" in outcomes:
        results["centre_concentration"] = claims.claim_centre_concentration(
            last_maps, rows["pixels"], success, (height, width)
        )
        if not control_maps:
            results["centre_concentration"]["not_computed"] = (
                "no control positions: attacks of more than one pixel"
            )
    else:
        results["centre_concentration"] = {
            "primary": None,
            "secondary": {},
            "verdict": "undecided (no successful attack)",
            "not_computed": "no successful attack",
        }
    results["figure9_similar"] = claims.claim_figure9(
        scalars["mean_abs_diff"], scalars["mean_abs_fm"], success, order
    )
    return {
        "maps": {"signed": signed, "layers": layers},
        "layers": order,
        "counts": {
            "successful": int(success.sum()),
            "failed": int((~success).sum()),
            "all": int(success.size),
        },
        "claims": {
            claim.key: claims.claim_record(claim, results[claim.key])
            for claim in claims.CLAIMS
        },
    }


@dataclasses.dataclass(frozen=True)
class StatisticsStudy:
    """The propagation maps over many attacks (`study_attacks`).

    `rows`: the attacks (`attacked_rows`); `shapes`: the layers' (H, W, K);
    `signed`: the maps' sign kept; `scalars`: per-image statistics {name: (N, L)};
    `mismatches`: attacks now predicted otherwise than `rows["pred_after"]`;
    `counts`: {"successful", "failed"}; `layer_stats`: {outcome:
    `propagation.per_outcome_layer_stats`}; `distances`: {outcome: each attacked
    pixel's Chebyshev distance from the centre}; `bin_edges` and `uniform`: one
    distance bin per square ring and the share of positions in each; `mean_maps`
    and `control_maps` ({control: mean maps}, empty for attacks of more than one
    pixel): `mean_maps`; `generation0`: `generation0_best_candidates`, or why it
    was not computed; `image_shape`: (H, W).
    """

    rows: dict[str, Any]
    shapes: dict[str, tuple[int, ...]]
    signed: bool
    scalars: dict[str, np.ndarray]
    mismatches: int
    counts: dict[str, int]
    layer_stats: dict[str, dict[str, np.ndarray]]
    distances: dict[str, np.ndarray]
    bin_edges: np.ndarray
    uniform: np.ndarray
    mean_maps: dict
    control_maps: dict[str, dict]
    generation0: dict[str, np.ndarray] | str
    image_shape: tuple[int, int]

    @property
    def order(self) -> list[str]:
        """The layers in forward order."""
        return list(self.shapes)

    def masks(self) -> dict[str, np.ndarray]:
        """{outcome: which attacks it holds} (`outcome_masks`)."""
        return outcome_masks(self.rows["success"])

    def mean_maps_arrays(self) -> dict[str, np.ndarray]:
        """The contents of mean_maps.npz: layers, counts (failed, successful) and
        "<pm_avg|pm_max>/<outcome>/<layer>" maps."""
        return {
            "layers": np.array(self.order),
            "counts": np.array([self.counts["failed"], self.counts["successful"]]),
            **{
                f"{key}/{layer}": value
                for key, maps in self.mean_maps.items()
                for layer, value in maps.items()
            },
        }

    def per_layer_rows(self) -> tuple[list[str], list[list[Any]]]:
        """(header, rows) of per_layer.csv (`per_layer_rows`)."""
        return per_layer_rows(self.shapes, self.layer_stats, self.masks())

    def claims_report(self, layers: str) -> dict[str, Any]:
        """`claims_report` of the study; `layers` names the maps' layer kind."""
        return claims_report(
            self.rows,
            self.scalars,
            self.order,
            self.mean_maps,
            self.control_maps,
            self.generation0,
            self.image_shape,
            self.signed,
            layers,
        )

    def layer_table(self) -> str:
        """Per layer and outcome the mean and 95th percentile of max|dFM| / max FM
        and the spread, as the experiment prints them."""
        lines = [
            f"{'layer':<26} {'outcome':<11} {'ratio mean':>10} {'p95':>7} {'spread':>7}"
        ]
        for j, layer in enumerate(self.order):
            for outcome in ("successful", "failed"):
                s = self.layer_stats[outcome]
                lines.append(
                    f"{layer:<26} {outcome:<11} {s['max_ratio_mean'][j]:>10.3f} "
                    f"{s['max_ratio_p95'][j]:>7.3f} {s['spread_mean'][j]:>7.1%}"
                )
        return "\n".join(lines)


def study_attacks(
    features_fn: FeaturesFn,
    variables: Variables,
    images: np.ndarray,
    rows: dict[str, Any],
    batch_size: int,
    seed: int = 0,
    signed: bool = False,
    *,
    attack_settings: dict[str, Any] | None = None,
    generation0: dict[str, np.ndarray] | None = None,
    source: str = "the attack table",
    progress: Progress = _no_progress,
) -> StatisticsStudy:
    """The propagation maps of every attack of `rows` (`attacked_rows`) on the
    clean test `images`, of the model `features_fn` (`models.contract`; the
    paper's: `models.linen_features(module)`), `batch_size` attacks per step.

    Refused (PropmapsError naming `source`) when the model predicts too many
    perturbed images otherwise than `rows["pred_after"]`. One-pixel attacks also
    stream the controls (`control_statistics`, keys from `seed`). `generation0`:
    the initial populations' best candidates when known (e.g. kept from an
    earlier run), else recomputed from `attack_settings` (the attack run's
    settings; `generation0_problem` says when they cannot be)."""
    shapes = models.check_model(features_fn, variables, images.shape[1:])
    order = list(shapes)
    state, scalars, predicted = stream_statistics(
        features_fn, variables, shapes, images, rows, batch_size, signed, progress
    )
    success, total = rows["success"], rows["index"].size
    counts = {"failed": int(state["count"][0]), "successful": int(state["count"][1])}
    mismatches = int(np.sum(predicted != rows["pred_after"]))
    # The one check of runs recorded without a weights hash (a few near ties may
    # flip on another device).
    require_predictions_match(source, mismatches, total)
    control_states = {}
    if rows["pixels"].shape[1] == 1:
        control_states = control_statistics(
            features_fn,
            variables,
            shapes,
            images,
            rows,
            batch_size,
            seed,
            signed,
            progress,
        )
    if generation0 is None:
        settings = attack_settings or {}
        generation0 = generation0_problem(settings) or generation0_best_candidates(
            models.logits_of(features_fn), variables, images, rows, settings, progress
        )
    masks = outcome_masks(success)
    height, width = images.shape[1:3]
    distances = stats.distance_from_centre(rows["pixels"], height, width)
    bin_edges = stats.distance_bin_edges(height, width)
    return StatisticsStudy(
        rows=rows,
        shapes=shapes,
        signed=signed,
        scalars=scalars,
        mismatches=mismatches,
        counts=counts,
        layer_stats={
            o: propagation.per_outcome_layer_stats(scalars, masks[o]) for o in OUTCOMES
        },
        distances={o: distances[masks[o]].reshape(-1) for o in OUTCOMES},
        bin_edges=bin_edges,
        uniform=stats.uniform_distance_fractions(height, width, bin_edges),
        mean_maps=mean_maps(state, counts, order),
        control_maps={
            name: mean_maps(s, counts, order) for name, s in control_states.items()
        },
        generation0=generation0,
        image_shape=(height, width),
    )
