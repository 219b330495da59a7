"""The locality study of one model's successful attacks, as one library call.

The paper's Table 1 asks whether the colour a one-pixel attack found still fools
the model elsewhere: at a nearby pixel, at a random pixel, at every pixel of a
Chebyshev ring (`locality`), at every pixel (vulnerability maps). Our controls ask
why (`locality_controls`: fragility strata, colour or place, context; `content` and
`content_controls`: the within-image analysis). The loops that run them over many
attacks live here, so that a user of the package runs the whole study on their own
model in one call (`locality_study`) and gets the same numbers the locality
experiment writes; the experiment (`experiments/locality.py`) adds only the run
directory: files, reuse of finished studies, progress lines.

Everything here computes: arrays in, arrays and dicts out. Progress lines go
through optional callbacks (`log`, `on_batch`), never to a stream. An attack
result is a `table`: the per-image arrays of attack.csv as read back (`index`,
`label`, `attacked`, `success`, `pixels` (N, 1, 5), `generations`,
`prob_true_before`, `prob_true_after`), in the attack's order; `images` and
`labels` are row-aligned with it (`images[i]` is the clean image of row i).
Random choices take the integer `seed` the experiments record, with
`fold_in(key(seed), test index)` per image, so results never depend on batching.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from propmaps_jax import batching, evaluation, stats
from propmaps_jax.analysis import content, content_controls, locality, locality_controls
from propmaps_jax.attack.driver import AttackResult
from propmaps_jax.errors import PropmapsError
from propmaps_jax.types import ApplyFn, Variables

Log = Callable[[str], None]

CONTROLS_BOOTSTRAP = 2000
# Recorded and recomputed clean p(true) may differ by float32 rounding (batch size,
# device) but not by more.
PROBABILITY_TOLERANCE = 1e-3
CONTROLS_BOOTSTRAP_STREAM = 0xB00C
# The per-attack moves as locality.csv holds them (what the controls read back).
MOVE_COLUMNS = (
    "index",
    "label",
    "row",
    "col",
    "r",
    "g",
    "b",
    "nearby_row",
    "nearby_col",
    "nearby_pred",
    "nearby_success",
    "random_row",
    "random_col",
    "random_pred",
    "random_success",
)


class OutcomesMismatch(PropmapsError):
    """Recorded nearby/random outcomes that this model does not reproduce."""


def _quiet(message: str) -> None:
    del message


def study_model(
    apply_fn: ApplyFn,
    variables: Variables,
    images: np.ndarray,
    labels: np.ndarray,
    indices: np.ndarray,
    pixels: np.ndarray,
    seed: int,
    max_distance: int,
    batch_size: int,
    permutation: tuple[int, ...] | None = None,
    *,
    log: Log = _quiet,
    on_batch: Callable[[int, int], None] | None = None,
) -> dict[str, np.ndarray]:
    """Per successful attack: nearby/random positions and outcomes, ring successes;
    with a model's pixel `permutation`, also the network-space nearby and rings.

    `on_batch(done, nearby successes so far)` after each batch."""
    n, height, width = len(indices), images.shape[1], images.shape[2]
    rows, cols = pixels[:, 0, 0], pixels[:, 0, 1]
    nearby_rc, random_rc = locality.protocol_moves(
        seed, indices, rows, cols, height, width
    )
    offsets, distances = locality.chebyshev_offsets(max_distance)
    per_batch = max(1, batch_size // (len(offsets) + 2))
    evaluate = functools.partial(
        locality.moves_program(apply_fn, max_distance), variables
    )
    out = {
        "nearby_pred": np.zeros(n, np.int32),
        "nearby_success": np.zeros(n, bool),
        "random_pred": np.zeros(n, np.int32),
        "random_success": np.zeros(n, bool),
        "ring_success": np.zeros((n, len(offsets)), bool),
        "ring_inside": np.zeros((n, len(offsets)), bool),
    }
    log(
        f"moving the pixels of {n} successful attacks: "
        f"{len(offsets) + 2} forward passes each, {per_batch} images per batch"
    )
    for batch in batching.batches(n, per_batch):
        take, start, count = batch.take, batch.start, batch.count
        nearby, random, rings, inside = jax.device_get(
            evaluate(
                images[take],
                labels[take],
                pixels[take],
                nearby_rc[take],
                random_rc[take],
            )
        )
        part = slice(start, start + count)
        out["nearby_pred"][part] = nearby.pred[:count]
        out["nearby_success"][part] = nearby.success[:count]
        out["random_pred"][part] = random.pred[:count]
        out["random_success"][part] = random.success[:count]
        out["ring_success"][part] = rings.success[:count] & inside[:count]
        out["ring_inside"][part] = inside[:count]
        if on_batch is not None:
            on_batch(start + count, int(out["nearby_success"][: start + count].sum()))
    out["nearby_rc"], out["random_rc"], out["distances"] = (
        nearby_rc,
        random_rc,
        distances,
    )
    if permutation is not None:
        log("the same colours moved in the network's coordinates")
        out.update(
            network_moves(
                apply_fn,
                variables,
                images,
                labels,
                indices,
                pixels,
                seed,
                max_distance,
                per_batch,
                permutation,
            )
        )
    return out


def network_moves(
    apply_fn: ApplyFn,
    variables: Variables,
    images: np.ndarray,
    labels: np.ndarray,
    indices: np.ndarray,
    pixels: np.ndarray,
    seed: int,
    max_distance: int,
    per_batch: int,
    permutation: tuple[int, ...],
) -> dict[str, np.ndarray]:
    """The network-space nearby and rings of a pixel-permuted model's attacks."""
    n, height, width = len(indices), images.shape[1], images.shape[2]
    netnearby_rc = locality.network_protocol_moves(
        seed, indices, pixels[:, 0, 0], pixels[:, 0, 1], permutation, height, width
    )
    offsets, _ = locality.chebyshev_offsets(max_distance)
    evaluate = functools.partial(
        locality.network_moves_program(apply_fn, max_distance, tuple(permutation)),
        variables,
    )
    out = {
        "netnearby_rc": netnearby_rc,
        "netnearby_pred": np.zeros(n, np.int32),
        "netnearby_success": np.zeros(n, bool),
        "netring_success": np.zeros((n, len(offsets)), bool),
        "netring_inside": np.zeros((n, len(offsets)), bool),
    }
    for batch in batching.batches(n, per_batch):
        take, start, count = batch.take, batch.start, batch.count
        nearby, rings, inside = jax.device_get(
            evaluate(images[take], labels[take], pixels[take], netnearby_rc[take])
        )
        part = slice(start, start + count)
        out["netnearby_pred"][part] = nearby.pred[:count]
        out["netnearby_success"][part] = nearby.success[:count]
        out["netring_success"][part] = rings.success[:count] & inside[:count]
        out["netring_inside"][part] = inside[:count]
    return out


def vulnerability_maps(
    apply_fn: ApplyFn,
    variables: Variables,
    images: np.ndarray,
    labels: np.ndarray,
    pixels: np.ndarray,
    batch_size: int,
) -> dict[str, np.ndarray]:
    """The colour of each attack at every position of its clean image: (V, H, W)."""
    height, width = images.shape[1], images.shape[2]
    chunk = min(batch_size, height * width)
    compute = functools.partial(
        locality.vulnerability_program(apply_fn, chunk), variables
    )
    maps = [
        jax.device_get(compute(images[i], labels[i], pixels[i, 0, 2:]))
        for i in range(len(images))
    ]
    shape = (len(images), height, width)
    return {
        "pred": np.asarray([m.pred for m in maps], np.int32).reshape(shape),
        "prob_true": np.asarray([m.prob_true for m in maps], np.float32).reshape(shape),
        "success": np.asarray([m.success for m in maps], bool).reshape(shape),
    }


def summarise(
    table: dict[str, np.ndarray], study: dict[str, np.ndarray], max_distance: int
) -> dict[str, Any]:
    """Every rate of one model, with 95% Wilson intervals."""
    n_samples = len(table["index"])
    correct = int(table["attacked"].sum())
    successes = int(table["success"].sum())
    result: dict[str, Any] = {
        "samples": n_samples,
        "correctly_classified": correct,
        "accuracy_on_samples": stats.proportion(correct, n_samples),
        "original_all": stats.proportion(successes, n_samples),
        "original_correct": stats.proportion(successes, correct),
        "random": stats.proportion(int(study["random_success"].sum()), successes),
        "nearby": stats.proportion(int(study["nearby_success"].sum()), successes),
    }
    result["distance"] = _ring_summary(study, "ring", max_distance, successes)
    if "netnearby_success" in study:  # a pixel-permuted model: network space too
        result["network_nearby"] = stats.proportion(
            int(study["netnearby_success"].sum()), successes
        )
        result["network_distance"] = _ring_summary(
            study, "netring", max_distance, successes
        )
    return result


def _ring_summary(study: dict, prefix: str, max_distance: int, successes: int):
    """Per distance: the pooled rate of the rings `prefix`_success / _inside."""
    rings = []
    for d in range(1, max_distance + 1):
        at_d = study["distances"] == d
        inside = study[f"{prefix}_inside"][:, at_d]
        success = study[f"{prefix}_success"][:, at_d]
        fraction = success.sum(axis=1) / np.maximum(inside.sum(axis=1), 1)
        rings.append(
            {
                "distance": d,
                "positions_per_image": int(at_d.sum()),
                "pooled": stats.proportion(int(success.sum()), int(inside.sum())),
                "mean_per_image_rate": float(fraction.mean()) if successes else None,
                "images_with_any_success": stats.proportion(
                    int(success.any(axis=1).sum()), successes
                ),
            }
        )
    return rings


def _empty_study(max_distance: int, permutation=None) -> dict[str, np.ndarray]:
    offsets, distances = locality.chebyshev_offsets(max_distance)
    spaces = ("", "net") if permutation is not None else ("",)
    out: dict[str, np.ndarray] = {"distances": distances}
    for space in spaces:
        out[f"{space}nearby_success"] = np.zeros(0, bool)
        out[f"{space}ring_success"] = np.zeros((0, len(offsets)), bool)
        out[f"{space}ring_inside"] = np.zeros((0, len(offsets)), bool)
    out["random_success"] = np.zeros(0, bool)
    return out


def _maps_summary(maps_arrays: dict, table: dict, succ_rows: np.ndarray) -> list:
    """Per vulnerability map: fooling positions and agreement with the attack."""
    summary = []
    for i, index in enumerate(maps_arrays["index"]):
        row, col = (int(v) for v in maps_arrays["pixels"][i, 0, :2])
        success, prob_true = maps_arrays["success"][i], maps_arrays["prob_true"][i]
        summary.append(
            {
                "index": int(index),
                "fooling_positions": stats.proportion(int(success.sum()), success.size),
                # Consistency with the attack: its own position must fool the model.
                "success_at_attack_position": bool(success[row, col]),
                "prob_true_at_attack_position": float(prob_true[row, col]),
                "attack_prob_true_after": float(table["prob_true_after"][succ_rows[i]]),
            }
        )
    return summary


def study_attacks(
    apply_fn: ApplyFn,
    variables: Variables,
    table: dict[str, np.ndarray],
    images: np.ndarray,
    labels: np.ndarray,
    *,
    seed: int,
    max_distance: int,
    num_maps: int,
    batch_size: int,
    permutation: tuple[int, ...] | None = None,
    log: Log = _quiet,
    on_batch: Callable[[int, int], None] | None = None,
) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(Table 1 summary, per-attack moves, vulnerability maps) of one attack table.

    The summary holds every rate of `summarise` and a record per vulnerability map
    (`num_maps` of the first successful attacks); the moves are `study_model`'s
    arrays (one row per successful attack); the maps hold `index`, `label`,
    `pixels` and `vulnerability_maps`' arrays."""
    succ_rows = np.flatnonzero(table["success"])
    index = table["index"][succ_rows]
    images, labels = images[succ_rows], labels[succ_rows]
    pixels = table["pixels"][succ_rows].astype(np.int32)
    study = (
        study_model(
            apply_fn,
            variables,
            images,
            labels,
            index,
            pixels,
            seed,
            max_distance,
            batch_size,
            permutation,
            log=log,
            on_batch=on_batch,
        )
        if len(succ_rows)
        else _empty_study(max_distance, permutation)
    )
    num_maps = min(num_maps, len(succ_rows))
    if num_maps:
        log(f"vulnerability maps of {num_maps} images")
    maps = (
        vulnerability_maps(
            apply_fn,
            variables,
            images[:num_maps],
            labels[:num_maps],
            pixels[:num_maps],
            batch_size,
        )
        if num_maps
        else {}
    )
    maps_arrays = {
        "index": index[:num_maps],
        "label": labels[:num_maps],
        "pixels": pixels[:num_maps],
        **maps,
    }
    result = summarise(table, study, max_distance)
    result["vulnerability_maps"] = (
        _maps_summary(maps_arrays, table, succ_rows) if num_maps else []
    )
    return result, study, maps_arrays


def moves_table(
    table: dict[str, np.ndarray], study: dict[str, np.ndarray], max_distance: int
) -> dict[str, np.ndarray]:
    """The successful attacks' moves as locality.csv holds them, in memory: int64
    columns (`MOVE_COLUMNS`, and `netnearby_*` for a pixel-permuted model) and per
    distance d = 1..max_distance the positions inside the image (`ring_n`) and
    those that fool the model (`ring_success`), (N, max_distance)."""
    succ_rows = np.flatnonzero(table["success"])
    n = len(succ_rows)
    network = "netnearby_rc" in study
    if not n:
        return {
            **{c: np.zeros(0, np.int64) for c in MOVE_COLUMNS},
            "ring_n": np.zeros((0, max_distance), np.int64),
            "ring_success": np.zeros((0, max_distance), np.int64),
        }
    pixels = table["pixels"][succ_rows, 0]
    columns = {"index": table["index"][succ_rows], "label": table["label"][succ_rows]}
    columns.update(zip(("row", "col", "r", "g", "b"), pixels.T, strict=True))
    for move in ("nearby", "random", "netnearby") if network else ("nearby", "random"):
        columns[f"{move}_row"] = study[f"{move}_rc"][:, 0]
        columns[f"{move}_col"] = study[f"{move}_rc"][:, 1]
        columns[f"{move}_pred"] = study[f"{move}_pred"]
        columns[f"{move}_success"] = study[f"{move}_success"]
    moved = {c: np.asarray(v, np.int64) for c, v in columns.items()}
    distances = study["distances"]
    for prefix in ("ring", "netring") if network else ("ring",):
        for what, key in (("n", "inside"), ("success", "success")):
            moved[f"{prefix}_{what}"] = np.stack(
                [
                    study[f"{prefix}_{key}"][:, distances == d].sum(axis=1)
                    for d in range(1, max_distance + 1)
                ],
                axis=1,
            ).astype(np.int64)
    return moved


@functools.cache
def _controls_evaluator(apply_fn):
    """Jitted: the three control outcomes of a fixed-size batch (variables first)."""

    @jax.jit
    def evaluate(variables, images, labels, pixels, nearby_rc, own, near, context):
        return locality_controls.evaluate_controls(
            apply_fn, variables, images, labels, pixels, nearby_rc, own, near, context
        )

    return evaluate


@functools.cache
def _probabilities_program(apply_fn):
    return jax.jit(
        lambda variables, images: locality_controls.clean_probabilities(
            apply_fn, variables, images
        )
    )


def controls_inputs(
    table: dict[str, np.ndarray], moved: dict[str, np.ndarray], margin: np.ndarray
) -> tuple[dict, dict]:
    """(attacked, per_attack) of the controls' statistics, before the draws.

    table: attack.csv read back; moved: locality.csv read back (its rows are the
    successful attacks, in attack.csv's order); margin: the clean margin of each
    attacked image, in attack.csv's order. Quartiles are over the attacked images.
    """
    attacked_rows = np.flatnonzero(table["attacked"])
    succ_rows = np.flatnonzero(table["success"])
    quartile, cuts = stats.quartile_groups(margin, margin)
    attacked = {
        "index": table["index"][attacked_rows],
        "success": table["success"][attacked_rows],
        "generations": table["generations"][attacked_rows],
        "margin": margin,
        "quartile": quartile,
        "cuts": cuts,
    }
    in_attacked = np.searchsorted(attacked_rows, succ_rows)
    pixels = table["pixels"][succ_rows]
    random_rc = np.stack([moved["random_row"], moved["random_col"]], 1)
    per_attack = {
        "index": table["index"][succ_rows],
        "generation0": table["generations"][succ_rows] == 0,
        "margin": margin[in_attacked],
        "quartile": quartile[in_attacked],
        "ring_n": moved["ring_n"],
        "ring_success": moved["ring_success"],
        "nearby_success": moved["nearby_success"].astype(bool),
        "random_success": moved["random_success"].astype(bool),
        "random_distance": np.max(np.abs(random_rc - pixels[:, 0, :2]), axis=1),
    }
    return attacked, per_attack


def run_controls(
    apply_fn,
    variables,
    table: dict[str, np.ndarray],
    moved: dict[str, np.ndarray],
    images: np.ndarray,
    labels: np.ndarray,
    seed: int,
    batch_size: int,
) -> tuple[dict, dict, locality_controls.Controls]:
    """(attacked, per_attack, draws): margins, strata and control outcomes.

    `moved`: the successful attacks' moves (`moves_table`, or locality.csv read
    back); `images`, `labels`: row-aligned with `table`.
    """
    index = table["index"][table["attacked"]]
    attacked_labels = labels[table["attacked"]]
    probs = batching.map_batches(
        functools.partial(_probabilities_program(apply_fn), variables),
        [images[table["attacked"]]],
        max(1, min(batch_size, len(index))),
    )
    margin = np.asarray(
        locality_controls.clean_margin(probs, attacked_labels), np.float64
    )
    # The margins must be the attacked model's: its clean p(true) as recorded.
    recorded = table["prob_true_before"][table["attacked"]]
    p_true = probs[np.arange(len(index)), attacked_labels]
    if len(index) and np.max(np.abs(p_true - recorded)) > PROBABILITY_TOLERANCE:
        worst = int(index[np.argmax(np.abs(p_true - recorded))])
        raise PropmapsError(
            f"the model's clean p(true) of test image {worst} differs from "
            "attack.csv's prob_true_before by more than "
            f"{PROBABILITY_TOLERANCE:g}: the attack was made with another model or "
            "data; run the locality experiment with that model, or into an empty "
            "--workdir"
        )
    attacked, per_attack = controls_inputs(table, moved, margin)
    succ_rows = np.flatnonzero(table["success"])
    images, labels = images[succ_rows], labels[succ_rows]
    pixels = table["pixels"][succ_rows].astype(np.int32)
    nearby_rc = np.stack([moved["nearby_row"], moved["nearby_col"]], 1)
    draws = locality_controls.draw_controls(
        seed, per_attack["index"], images, pixels, nearby_rc
    )
    per_attack.update(
        context_found=draws.context_found,
        context_candidates=draws.context_candidates,
        context_distance=draws.context_distance,
        nearby_context_distance=draws.nearby_context_distance,
    )
    if len(succ_rows):
        evaluate = functools.partial(_controls_evaluator(apply_fn), variables)
        own, near, context = batching.map_batches(
            evaluate,
            [
                images,
                labels,
                pixels,
                nearby_rc.astype(np.int32),
                draws.own_colour,
                draws.nearby_colour,
                draws.context_rc,
            ],
            max(1, min(batch_size // 3, len(succ_rows))),
        )
        per_attack["own_random_colour_success"] = own.success.astype(bool)
        per_attack["nearby_random_colour_success"] = near.success.astype(bool)
        per_attack["context_success"] = context.success.astype(bool)
    else:
        for move in ("own_random_colour", "nearby_random_colour", "context"):
            per_attack[f"{move}_success"] = np.zeros(0, bool)
    return attacked, per_attack, draws


def content_controls_study(
    apply_fn: ApplyFn,
    variables: Variables,
    table: dict[str, np.ndarray],
    images: np.ndarray,
    labels: np.ndarray,
    nearby_rc: np.ndarray,
    moves: dict[str, np.ndarray],
    seed: int,
    batch_size: int,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The image-content controls (`content_controls`) of one model's successful
    attacks: another attack's colour at the attack's own and at the nearby position
    (the attacks' own colour distribution, where the older control draws uniform
    RGB), the attack's colour at a position matched on 3x3 context *and* distance
    from the centre, and nearby - random per stratum of the clean margin's logit
    and of generation 0 / search, each with an interval from a bootstrap over
    images. `images`, `labels`: row-aligned with `table`; `nearby_rc` and `moves`
    (`content.move_rates`' input): one row per successful attack. Returns
    (summary, per-attack arrays)."""
    succ_rows = np.flatnonzero(table["success"])
    index = table["index"][succ_rows]
    attacked_images, attacked_labels = (
        images[table["attacked"]],
        labels[table["attacked"]],
    )
    images, labels = images[succ_rows], labels[succ_rows]
    pixels = table["pixels"][succ_rows].astype(np.int32)
    draws = content_controls.draw_content_controls(seed, index, images, pixels)
    own, near, matched = batching.map_batches(
        functools.partial(_controls_evaluator(apply_fn), variables),
        [
            images,
            labels,
            pixels,
            nearby_rc,
            draws.attack_colour_own,
            draws.attack_colour_nearby,
            draws.matched_rc,
        ],
        max(1, min(batch_size // 3, len(index))),
    )
    probs = batching.map_batches(
        functools.partial(_probabilities_program(apply_fn), variables),
        [attacked_images],
        max(1, min(batch_size, len(attacked_images))),
    )
    margin_logit = content.clean_margin_logit(probs, attacked_labels)
    in_attacked = np.searchsorted(np.flatnonzero(table["attacked"]), succ_rows)
    found = draws.matched_found
    other_own = own.success.astype(bool)
    other_nearby = near.success.astype(bool)
    matched_success = matched.success.astype(bool)
    summary = content.controls_summary(
        moves,
        other_own,
        other_nearby,
        matched_success,
        draws,
        index,
        margin_logit,
        in_attacked,
        table["generations"][succ_rows] == 0,
        seed,
    )
    arrays = {
        "other_colour_own_success": other_own,
        "other_colour_nearby_success": other_nearby,
        "centre_matched_found": found,
        "centre_matched_success": matched_success,
        "margin_logit": margin_logit[in_attacked].astype(np.float32),
    }
    return summary, arrays


def controls_study(
    apply_fn: ApplyFn,
    variables: Variables,
    table: dict[str, np.ndarray],
    moved: dict[str, np.ndarray],
    images: np.ndarray,
    labels: np.ndarray,
    seed: int,
    batch_size: int,
    *,
    log: Log = _quiet,
) -> tuple[dict[str, Any], dict, dict, locality_controls.Controls]:
    """The locality controls of one attack table (`locality_controls`): fragility
    strata, colour or place, distance after fragility, and the verdict by its
    fixed rule, each with a bootstrap over images.

    Returns (summary, attacked, per_attack, draws): the summary is what the
    experiment records (controls.json); the other three are `run_controls`'
    (controls.csv's rows)."""
    start = time.time()
    log(
        f"locality controls of {int(table['success'].sum())} successful attacks "
        f"({int(table['attacked'].sum())} clean forwards for the margins, 3 per attack)"
    )
    attacked, per_attack, draws = run_controls(
        apply_fn, variables, table, moved, images, labels, seed, batch_size
    )
    forward_s = time.time() - start
    rng = np.random.default_rng([seed, CONTROLS_BOOTSTRAP_STREAM])
    summary = locality_controls.summarise_controls(
        per_attack, attacked, rng, CONTROLS_BOOTSTRAP
    )
    summary["margin_quartile_cuts"] = [float(c) for c in attacked["cuts"]]
    summary["generation0_successes"] = int(per_attack["generation0"].sum())
    summary["forwards_s"] = forward_s
    summary["wall_time_s"] = time.time() - start
    return summary, attacked, per_attack, draws


def within_image_study(
    apply_fn: ApplyFn,
    variables: Variables,
    table: dict[str, np.ndarray],
    moved: dict[str, np.ndarray],
    images: np.ndarray,
    labels: np.ndarray,
    seed: int,
    max_distance: int,
    batch_size: int,
    permutation: tuple[int, ...] | None = None,
    *,
    log: Log = _quiet,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Receptive field or image content: one model's measures (`content`), and the
    content controls (`content_controls_study`). Returns (record, per-position
    arrays).

    The ring outcomes per position are recomputed (`moved` keeps their counts
    only); `OutcomesMismatch` when the model does not reproduce `moved`'s nearby
    and random outcomes. `images`, `labels`: row-aligned with `table`.
    """
    succ_rows = np.flatnonzero(table["success"])
    index = table["index"][succ_rows]
    succ_images, succ_labels = images[succ_rows], labels[succ_rows]
    pixels = table["pixels"][succ_rows].astype(np.int32)
    nearby_rc = np.stack([moved["nearby_row"], moved["nearby_col"]], 1)
    random_rc = np.stack([moved["random_row"], moved["random_col"]], 1)
    nearby_rc, random_rc = nearby_rc.astype(np.int32), random_rc.astype(np.int32)
    start = time.time()
    log(f"within-image analysis of {len(index)} successful attacks")
    offsets, _ = locality.chebyshev_offsets(max_distance)
    per_batch = max(1, batch_size // (len(offsets) + 2))
    nearby, random, rings, inside = batching.map_batches(
        functools.partial(locality.moves_program(apply_fn, max_distance), variables),
        [succ_images, succ_labels, pixels, nearby_rc, random_rc],
        per_batch,
    )
    if not (
        np.array_equal(nearby.success, moved["nearby_success"].astype(bool))
        and np.array_equal(random.success, moved["random_success"].astype(bool))
    ):
        raise OutcomesMismatch(
            "the recorded nearby/random outcomes are not this model's: recompute "
            "the locality study with this model"
        )
    spaces = {"image": (rings.success & inside, inside, None)}
    moves = {
        "nearby": moved["nearby_success"].astype(bool),
        "random": moved["random_success"].astype(bool),
    }
    if permutation is not None:
        netnearby_rc = np.stack(
            [moved["netnearby_row"], moved["netnearby_col"]], 1
        ).astype(np.int32)
        net_nearby, net_rings, net_inside = batching.map_batches(
            functools.partial(
                locality.network_moves_program(
                    apply_fn, max_distance, tuple(permutation)
                ),
                variables,
            ),
            [succ_images, succ_labels, pixels, netnearby_rc],
            per_batch,
        )
        spaces["network"] = (net_rings.success & net_inside, net_inside, permutation)
        moves["network_nearby"] = moved["netnearby_success"].astype(bool)
    controls, control_arrays = content_controls_study(
        apply_fn, variables, table, images, labels, nearby_rc, moves, seed, batch_size
    )
    result: dict[str, Any] = {
        "moves": content.move_rates(moves, index, seed),
        "controls": controls,
        "spaces": {},
    }
    arrays = {"index": index.astype(np.int32), **control_arrays}
    for space, (success, inside_space, perm) in spaces.items():
        rows = content.ring_rows(
            succ_images, pixels, success, inside_space, max_distance, perm
        )
        result["spaces"][space] = {
            "rings": content.ring_rates(rows, max_distance, seed),
            "fixed_effects": content.distance_effects(rows, seed),
        }
        arrays.update(content.rows_to_arrays(rows, space))
    result["wall_time_s"] = time.time() - start
    return result, arrays


# ----- the one call: a user's model, images and attack result ------------------


@dataclasses.dataclass(frozen=True)
class LocalityStudy:
    """What `locality_study` found for one model.

    summary: Table 1's rates (`summarise`: accuracy on the samples, original
      over all and over correctly classified samples, random, nearby, network
      nearby for a permuted model, each a `stats.proportion` with its 95% Wilson
      interval), the rings by distance (`distance`) and the vulnerability maps'
      records; moves: per successful attack, the moved positions and outcomes
      (`study_model`); maps: the vulnerability maps' arrays; controls: the
      controls' summary (`controls_study`), or None; within_image: the
      within-image record (`within_image_study`), or None.
    """

    summary: dict[str, Any]
    moves: dict[str, np.ndarray]
    maps: dict[str, np.ndarray]
    controls: dict[str, Any] | None = None
    within_image: dict[str, Any] | None = None


def attack_table(
    indices: np.ndarray,
    labels: np.ndarray,
    pred_before: np.ndarray,
    prob_true_before: np.ndarray,
    attack: AttackResult,
) -> dict[str, np.ndarray]:
    """The attack table of an `AttackResult`, as attack.csv is read back.

    Only correctly classified images count as attacked (the paper's protocol);
    the attack of a misclassified image is not a success."""
    attacked = np.asarray(pred_before) == np.asarray(labels)
    return {
        "index": np.asarray(indices, np.int64),
        "label": np.asarray(labels, np.int64),
        "pred_before": np.asarray(pred_before, np.int64),
        "prob_true_before": np.asarray(prob_true_before, np.float64),
        "attacked": attacked,
        "success": np.asarray(attack.success, bool) & attacked,
        "pred_after": np.asarray(attack.pred_after, np.int64),
        "prob_true_after": np.asarray(attack.prob_true_after, np.float64),
        "generations": np.asarray(attack.generations, np.int64),
        "evaluations": np.asarray(attack.evaluations, np.int64),
        "pixels": np.asarray(attack.pixels, np.int64),
    }


def locality_study(
    apply_fn: ApplyFn,
    variables: Variables,
    images: np.ndarray,
    labels: np.ndarray,
    attack: AttackResult,
    *,
    indices: np.ndarray | None = None,
    seed: int = 0,
    max_distance: int = 4,
    vulnerability_maps: int = 0,
    controls: bool = True,
    within_image: bool = False,
    batch_size: int = 1024,
    permutation: tuple[int, ...] | None = None,
    log: Log = _quiet,
) -> LocalityStudy:
    """The locality study (Table 1, rings, controls) of one model's attacks.

    Args:
      apply_fn, variables: the model, `apply_fn(variables, images) -> logits`.
      images, labels: the attacked images (N, H, W, 3), 0..255, and their labels.
      attack: the one-pixel `AttackResult` of those images (`pj.attack.attack`
        with the same `indices`).
      indices: the images' dataset indices, which seed each image's random moves
        (`fold_in(key(seed), index)`); default 0..N-1.
      seed: the seed of every random choice (moves, controls' draws, bootstraps).
      max_distance: the largest Chebyshev ring.
      vulnerability_maps: how many of the first successful attacks get a map.
      controls: run the locality controls (`controls_study`).
      within_image: run the within-image analysis (`within_image_study`).
      batch_size: forwards per device call.
      permutation: the model's pixel permutation, if any (network-space moves).
      log: called with progress lines.
    Returns:
      A `LocalityStudy`; `table1_markdown` renders its Table 1.
    """
    images, labels = np.asarray(images), np.asarray(labels)
    if indices is None:
        indices = np.arange(len(images))
    locality.check_one_pixel(np.asarray(attack.pixels))
    pred, prob_true = evaluation.predict_labels(
        apply_fn, variables, images, labels, batch_size
    )
    table = attack_table(indices, labels, pred, prob_true, attack)
    summary, moves, maps = study_attacks(
        apply_fn,
        variables,
        table,
        images,
        labels,
        seed=seed,
        max_distance=max_distance,
        num_maps=vulnerability_maps,
        batch_size=batch_size,
        permutation=permutation,
        log=log,
    )
    moved = moves_table(table, moves, max_distance)
    control_summary = within = None
    if controls and table["attacked"].any():
        control_summary = controls_study(
            apply_fn, variables, table, moved, images, labels, seed, batch_size, log=log
        )[0]
    if within_image and table["success"].any():
        within = within_image_study(
            apply_fn,
            variables,
            table,
            moved,
            images,
            labels,
            seed,
            max_distance,
            batch_size,
            permutation,
            log=log,
        )[0]
    return LocalityStudy(summary, moves, maps, control_summary, within)


def table1_markdown(studies: dict[str, LocalityStudy]) -> str:
    """Table 1 of one or more studies as Markdown: the rates (each: rate (count;
    95% Wilson interval)), then the success rate by Chebyshev distance."""
    names = list(studies)
    rows = [
        ("accuracy_on_samples", "accuracy on the samples"),
        ("original_all", "original one-pixel attack (over all samples)"),
        ("original_correct", "original one-pixel attack (over correctly classified)"),
        ("random", "on random pixels"),
        ("nearby", "on nearby pixels"),
        ("network_nearby", "on nearby pixels in the network's coordinates"),
    ]
    lines = ["| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for key, label in rows:
        if any(key in s.summary for s in studies.values()):
            cells = [
                stats.format_proportion(s.summary[key]) if key in s.summary else "n/a"
                for s in studies.values()
            ]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    depth = max(len(s.summary["distance"]) for s in studies.values())
    lines += ["", "| distance | " + " | ".join(names) + " |"]
    lines.append("|---|" + "---|" * len(names))
    for i in range(depth):
        cells = [
            stats.format_proportion(s.summary["distance"][i]["pooled"])
            if i < len(s.summary["distance"])
            else "n/a"
            for s in studies.values()
        ]
        lines.append(f"| {i + 1} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
