"""Propagation maps over many attacks (paper section 6, figures 7-9, plus numbers).

    python launch.py --experiment=statistics --model=resnet --weights=W --workdir=DIR

Reads every attacked image of DIR/attack.csv (a failed attack contributes its best
candidate; a run made with another model, other weights or other data than the
ones given is refused, and so is one whose predictions the model does not
reproduce), streams them in batches through one jitted step that adds the
propagation maps to running sums on the device (only per-image scalars come back
to the host), and writes to DIR/statistics/:

- mean_pm_avg_successful.png, mean_pm_avg_failed.png (figures 7/8): per layer the
  mean PM_avg over successful / failed attacks, each panel scaled to its own max;
- layer_means.png (figure 9): per layer the mean |FM - FM_adv| over all feature
  maps for successful and failed attacks, beside the mean original feature map;
- distance_from_centre.png: where the attacked pixels lie (Chebyshev distance
  max(|dr|, |dc|) from the image centre, one bin per square ring, beside the share
  of positions in each ring: where pixels chosen at random would lie);
- per_layer.csv and summary.json: per layer and outcome the mean and 95th
  percentile of max|dFM| / max FM, the fraction of attacks where it reaches 1, the
  spread (fraction of positions where PM_max > 10% of the layer's original max),
  the mean |dFM| and mean FM; per outcome the distance of the pixel from the centre;
- mean_maps.npz: the mean PM_avg and PM_max maps per layer and outcome;
- claims.json and claims.md: the paper's sentences read as the paper means them
  (`propmaps_jax.claims.CLAIMS`): per sentence the layers its argument is about,
  one primary statistic with its interval and why it is the sentence's meaning,
  the verdict computed from it alone, and secondary statistics beside it (the
  format: `experiments.runs.claims_json`). The effort-matched secondary of
  "failed attacks farther from the centre" is each attack's best candidate of
  its initial population (recomputed from the run's seed and checked against
  the attacks that succeeded in it); "concentrate close to the center" compares
  the last layer's mean PM_avg map with the same colours at positions drawn at
  each attack's own distance from the centre (its primary) and at uniform
  positions (mean_pm_avg_uniform_positions.png). Each claims file says whether
  its rules were fixed before the run's numbers existed (prospective) or not
  (retrospective), from git's date of the rules' last commit.

--signed and --layers=conv_relu|bn_relu write to statistics_signed/,
statistics_conv_relu/, ... (the default maps: statistics/).
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags, logging

from experiments import common, flag_groups
from experiments.report import plots
from experiments.report import tables as report_tables
from experiments.report.progress import Progress
from experiments.runs import integrity, rundir, storage
from propmaps_jax import attack_de, batching, claims, models, propagation, stats
from propmaps_jax.attack.perturb import apply_pixels_batch
from propmaps_jax.errors import PropmapsError
from propmaps_jax.results import attack_csv, claims_json

FLAGS = flags.FLAGS
# The shared flags this experiment reads (experiments/flag_groups.py).
FLAGS_READ = (
    *flag_groups.RUN,
    *flag_groups.MODEL,
    *flag_groups.FIGURES,
    "batch_size",
    "seed",
)

OUTCOMES = ("successful", "failed", "all")
DISTANCE_METRIC = "Chebyshev distance (max(|dr|, |dc|))"
# fold_in constant of the control positions' key (apart from the attack's keys).
CONTROL_STREAM = 1_000_003
# Images per batch of the generation-0 recomputation (each: a population).
GENERATION0_CANDIDATES_PER_BATCH = 2048


def _attacked(run: attack_csv.AttackRun) -> dict[str, np.ndarray]:
    """The attacked rows of an attack run: index, pixels, success, pred_after, and
    the number of rows that were not attacked."""
    table = run.table
    attacked = np.flatnonzero(table["attacked"])
    if attacked.size == 0:
        raise PropmapsError(
            f"{run.csv_path} holds no attacked image (all were misclassified before "
            "the attack or it is empty): attack more images first"
        )
    rows = {
        k: table[k][attacked]
        for k in (
            "index",
            "label",
            "pixels",
            "success",
            "pred_after",
            "generations",
            "prob_true_before",
            "prob_true_after",
        )
    }
    rows["not_attacked"] = int(table["index"].size - attacked.size)
    return rows


def output_folder() -> str:
    """statistics, or statistics_signed / statistics_<layers> for other maps."""
    name = "statistics"
    if FLAGS.signed:
        name += "_signed"
    if FLAGS.layers != "conv":
        name += f"_{FLAGS.layers}"
    return name


def _stream(module, variables, shapes, images, rows, batch_size, signed):
    """(running sums, per-image scalars {name: (N, L)}, predictions after) of every
    attack, in batches through one jitted step (sums stay on the device)."""
    order = list(shapes)
    filter_fn, relu = propagation.layer_selection(FLAGS.layers)

    def step(state, v, batch_images, batch_pixels, batch_success, valid):
        perturbed = apply_pixels_batch(batch_images, batch_pixels)
        return propagation.accumulate_statistics(
            state,
            module,
            v,
            batch_images,
            perturbed,
            batch_success,
            valid,
            signed,
            filter_fn,
            relu,
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
    progress = Progress(total, "attacks")
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
        progress.update(end, successes=int(success[:end].sum()))
    return jax.device_get(state), scalars, predicted


def _controls(module, variables, shapes, images, rows, batch_size):
    """{"uniform_positions", "distance_matched"}: running sums of the attacks'
    colours put at other positions (one per test image, from the seed), outcomes
    kept: drawn uniformly, and drawn at each attack's own distance from the
    centre (`claims.distance_matched_positions`)."""
    height, width = images.shape[1:3]
    key = jax.random.fold_in(jax.random.key(FLAGS.seed), CONTROL_STREAM)
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
        states[name], _, _ = _stream(
            module,
            variables,
            shapes,
            images,
            {**rows, "pixels": moved},
            batch_size,
            FLAGS.signed,
        )
    return states


GENERATION0_NAME = "generation0.npz"


def _generation0(module, variables, images, rows, summary, workdir):
    """{"best", "reported": pixels (N, k, 5), "success": (N,)} of every attack's
    initial population, recomputed from the run's seed and settings; or a string
    saying why it cannot be. Kept in DIR/generation0.npz, reused when it is of
    the same attacks and settings (the maps chosen do not change it)."""
    settings = (summary or {}).get("settings", {})
    if not settings:
        return "no attack_summary.json beside attack.csv: seed and settings unknown"
    if settings.get("target") is not None:
        return "a targeted attack (the comparison is for untargeted runs)"
    needed = ("seed", "pixels", "population", "generations")
    missing = [k for k in needed if k not in settings]
    if missing:
        return f"attack_summary.json does not record {', '.join(missing)}"
    record = json.dumps(settings, sort_keys=True)
    path = os.path.join(workdir, GENERATION0_NAME)
    kept = integrity.read_npz(path)  # None when missing, truncated or unreadable
    needed_arrays = ("best", "reported", "success", "index", "settings")
    if (
        kept is not None
        and all(k in kept for k in needed_arrays)
        and str(kept["settings"]) == record
        and np.array_equal(kept["index"], rows["index"])
    ):
        logging.info("initial populations' best candidates from %s", path)
        return {k: kept[k] for k in ("best", "reported", "success")}
    if storage.exists(path):
        integrity.note(
            f"recomputing {GENERATION0_NAME}: unreadable, or of other attacks or "
            "settings"
        )
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
    apply_fn = models.make_apply_fn(module)

    def one(index, v, image, label):
        return claims.generation0_best(
            attack_de.image_key(key, index), apply_fn, v, image, label, config
        )

    best_of = jax.jit(jax.vmap(one, in_axes=(0, None, 0, 0)))
    per_batch = max(1, GENERATION0_CANDIDATES_PER_BATCH // config.population)
    indices, total = rows["index"], rows["index"].size
    out = batching.map_batches(
        lambda index, image, label: best_of(
            jnp.asarray(index, jnp.int32),
            variables,
            jnp.asarray(image),
            jnp.asarray(label, jnp.int32),
        ),
        [indices, images[indices], rows["label"]],
        per_batch,
        on_batch=Progress(total, "initial populations").update,
    )
    rundir.write_npz(
        path, {**out, "index": rows["index"], "settings": np.array(record)}
    )
    return out


def _claims(rows, scalars, order, mean_maps, control_maps, generation0, shape):
    """claims.json: the paper's sentences read as the paper means them, each a
    `claims.claim_record` (see propmaps_jax.claims and experiments.runs.claims_json)."""
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
    last_maps = {"attacks": {o: mean_maps[f"pm_avg/{o}"][top] for o in outcomes}}
    for name, maps in control_maps.items():
        last_maps[name] = {o: maps[f"pm_avg/{o}"][top] for o in outcomes}
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
        "schema": claims_json.SCHEMA,
        "maps": {"signed": FLAGS.signed, "layers": FLAGS.layers},
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


def _pct(prop: dict | None) -> str:
    if prop is None:
        return "n/a"
    return report_tables.short_cell(prop, empty="n/a", unit="%")


def _ratio(r: dict) -> str:
    if r.get("ci_low") is None:
        return f"{r['ratio']:.3g}"
    return f"{r['ratio']:.3g} ({r['ci_low']:.3g}–{r['ci_high']:.3g})"


def _profile(profile: dict) -> str:
    if not profile.get("n"):
        return "n/a"
    return "largest/smallest " + _ratio(profile["largest_over_smallest"])


def _primary_cells(key: str, entry: dict) -> tuple[str, str]:
    """(successful, failed) cells of a claim's primary statistic."""
    p, sec = entry["primary"], entry["secondary"]
    if p is None:
        return "n/a", "n/a"
    if key == "close_to_max":
        return _pct(p), _pct(sec["failed_last_layer"])
    if key == "same_across_layers":
        return _profile(p), _profile(sec[p["statistic"]]["failed"])
    if key == "failed_farther_from_centre":
        return _pct(p["successful"]), _pct(p["failed"])
    if key == "quarter_of_last_map":
        return _pct(p), _pct(sec["failed"])
    if key == "centre_concentration":
        cells = []
        for o in ("successful", "failed"):
            if o not in sec:
                cells.append("n/a")
                continue
            m = sec[o]["central_mass_share"]
            cells.append(
                f"excess {100 * sec[o]['excess_over_distance_matched']:+.1f} points "
                f"({m['attacks']:.1%} against {m.get('distance_matched', np.nan):.1%})"
            )
        return cells[0], cells[1]
    if key == "figure9_similar":
        ratios = p["failed_over_successful"]
        return (
            f"failed/successful, last layer {_ratio(ratios[-1])}",
            f"failed higher in {len(p['failed_higher_in_layers'])} of "
            f"{len(ratios)} layers",
        )
    raise KeyError(key)


def _secondary_lines(key: str, entry: dict, order: list[str]) -> list[str]:
    """The secondary statistics of a claim, one bullet each."""
    sec, lines = entry["secondary"], []
    if entry["primary"] is None:
        return lines
    if key == "close_to_max":
        per = sec["per_layer"]
        best = order.index(sec["best_layer"])
        for t in per["successful"]:
            for j in sorted({0, best, len(order) - 1}):
                lines.append(
                    rf"max\|dFM\|/max FM >= {t}, {order[j]}: successful "
                    f"{_pct(per['successful'][t][j])}, failed "
                    f"{_pct(per['failed'][t][j])}"
                )
    elif key == "same_across_layers":
        for name, by_outcome in sec.items():
            ok, failed = by_outcome["successful"], by_outcome["failed"]
            peaks = ""
            if ok.get("n"):
                means = [layer["mean"] for layer in ok["per_layer"]]
                peaks = f"; successful, first {means[0]:.3g}, last {means[-1]:.3g}"
            lines.append(
                f"{name}: successful {_profile(ok)} ({ok['verdict']}), failed "
                f"{_profile(failed)}{peaks}"
            )
    elif key == "failed_farther_from_centre":
        lines.append(
            f"share of positions in the central square: {sec['uniform_share']:.0%}"
        )
        g = sec["generation0"]
        if "not_computed" in g:
            lines.append(
                f"initial population's best: not computed ({g['not_computed']})"
            )
        else:
            lines.append(
                f"initial population's best: successful {_pct(g['successful'])}, "
                f"failed {_pct(g['failed'])} ({g['verdict_if_primary']} if it were "
                "primary)"
            )
            ch = g["check"]
            lines.append(
                f"generation-0 recomputation: {ch['recorded_pixel_recomputed']} of the "
                f"{ch['succeeded_at_generation0']} attacks that succeeded in their "
                "initial population give the recorded pixel"
            )
    elif key == "quarter_of_last_map":
        weak = sec["weak_threshold"]
        lines.append(
            f"PM_max > {propagation.SPREAD_THRESHOLD:g} max FM on > 25%: successful "
            f"{_pct(weak['successful'])}, failed {_pct(weak['failed'])}"
        )
    elif key == "centre_concentration":
        lines.append(f"central square: {sec['share_of_positions']:.0%} of positions")
        for o in ("successful", "failed"):
            if o not in sec:
                continue
            m = sec[o]["central_mass_share"]
            lines.append(
                f"{o}: central mass {m['attacks']:.1%}; distance-matched positions "
                f"{m.get('distance_matched', np.nan):.1%}; uniform positions "
                f"{m.get('uniform_positions', np.nan):.1%}; pixels in the central "
                f"square {_pct(sec[o]['pixels_in_central_square'])}"
            )
    elif key == "figure9_similar":
        for name, reading in (
            ("raw (figure 9)", entry["primary"]),
            (
                "each image's |dFM| / its own mean |FM|",
                sec["divided_by_own_mean_abs_fm"],
            ),
        ):
            ratios = reading["failed_over_successful"]
            higher = reading["failed_higher_in_layers"]
            lines.append(
                f"{name}: failed/successful first layer {_ratio(ratios[0])}, last "
                f"{_ratio(ratios[-1])}; failed higher in {len(higher)} of "
                f"{len(ratios)} layers"
            )
    return lines


def claims_table(report: dict) -> str:
    """claims.md: provenance, then per sentence its reading, the primary statistic
    and verdict in one table, and the secondary statistics below."""
    maps = report["maps"]
    prov = report.get("provenance", {})
    lines = [
        f"Maps: {'signed FM - FM_adv' if maps['signed'] else '|FM - FM_adv|'}"
        f" of {maps['layers']} layers; attacks: "
        + ", ".join(f"{n} {o}" for o, n in report["counts"].items()),
        "",
        f"Rules: {prov.get('status', 'unknown')} ({prov.get('why', '')}; rules "
        f"last committed {prov.get('rules_committed') or 'unknown'}, the run's "
        f"numbers first known {prov.get('numbers_first_seen') or 'unknown'}).",
        "",
        "| sentence | primary statistic | successful | failed | verdict |",
        "| --- | --- | --- | --- | --- |",
    ]
    for key, entry in report["claims"].items():
        ok, failed = _primary_cells(key, entry)
        cells = [key, entry["primary_statistic"], ok, failed, entry["verdict"]]
        # A "|" inside a cell (|dFM|) would end it.
        lines.append("| " + " | ".join(c.replace("|", r"\|") for c in cells) + " |")
    for key, entry in report["claims"].items():
        lines += [
            "",
            f"### {key}",
            "",
            f'"{entry["words"]}" ({entry["source"]}; about {entry["layers"]})',
            "",
            f"- primary: {entry['primary_statistic']}; why: {entry['why']}",
            f"- rule: {entry['rule']}",
        ]
        if entry.get("not_computed"):
            lines.append(f"- not computed: {entry['not_computed']}")
        lines += [
            f"- {line}" for line in _secondary_lines(key, entry, report["layers"])
        ]
    return "\n".join(lines) + "\n"


def _mean_maps(state, counts: dict[str, int], order: list[str]) -> dict:
    """{"pm_avg/successful": {layer: (H, W)}, ...}: the mean maps per outcome."""
    # Outcome index 0 = failed, 1 = successful (see init_statistics).
    mean_maps = {}
    for outcome, slot in (("failed", 0), ("successful", 1)):
        n = max(counts[outcome], 1)
        for reduce in ("avg", "max"):
            mean_maps[f"pm_{reduce}/{outcome}"] = {
                layer: state[f"pm_{reduce}_sum"][layer][slot] / n for layer in order
            }
    return mean_maps


def _per_layer_csv(shapes, layer_stats, masks) -> str:
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
    return rundir.csv_text(header, csv_rows)


def _figures(out_dir, mean_maps, shapes, counts, layer_stats, distances, bins):
    """Figures 7, 8 and 9 of the paper and the distance histogram."""
    order, total = list(shapes), sum(counts.values())
    what = "FM - FM_adv" if FLAGS.signed else "|FM - FM_adv|"
    for figure, outcome in (("7", "successful"), ("8", "failed")):
        path = os.path.join(out_dir, f"mean_pm_avg_{outcome}.png")
        if counts[outcome] == 0:
            logging.info("no %s attacks: no %s", outcome, path)
            continue
        fig = plots.mean_maps_figure(
            mean_maps[f"pm_avg/{outcome}"],
            shapes,
            f"Mean PM_avg (mean over channels of {what}) over {counts[outcome]} "
            f"{outcome} attacks, {FLAGS.model} (figure {figure} of the paper)",
            "colour scale of each layer: 0 .. the maximum of its mean map "
            "(not scaled to the feature maps)",
            columns=FLAGS.columns,
            bar_title="mean PM_avg",
        )
        plots.save_figure(fig, path)
        print(f"wrote {path}")

    # Pre-activation conv outputs are often negative on average: compare the mean
    # |dFM| with the mean magnitude |FM| of the original maps (log scale); the signed
    # mean FM is in per_layer.csv.
    curves = {
        f"successful ({counts['successful']}): mean |FM - FM_adv|": layer_stats[
            "successful"
        ]["mean_abs_diff"],
        f"failed ({counts['failed']}): mean |FM - FM_adv|": layer_stats["failed"][
            "mean_abs_diff"
        ],
        "original feature maps: mean |FM| (all attacked images)": layer_stats["all"][
            "mean_abs_fm"
        ],
    }
    all_values = np.concatenate([np.asarray(c) for c in curves.values()])
    log_scale = bool(np.all(all_values[np.isfinite(all_values)] > 0))
    fig = plots.layer_means_figure(
        order,
        curves,
        f"Mean over all feature maps (positions and channels) per layer, "
        f"{FLAGS.model}, {total} attacks (figure 9 of the paper)",
        "mean value" + (" (log scale)" if log_scale else ""),
        log_scale=log_scale,
    )
    path = os.path.join(out_dir, "layer_means.png")
    plots.save_figure(fig, path)
    print(f"wrote {path}")

    bin_edges, uniform = bins
    fig = plots.distance_histogram_figure(
        {o: distances[o] for o in ("successful", "failed")},
        bin_edges,
        f"Attacked pixels: {DISTANCE_METRIC} from the image centre, {FLAGS.model}",
        f"{DISTANCE_METRIC} of the attacked pixel from the image centre (pixels)",
        uniform=uniform,
    )
    path = os.path.join(out_dir, "distance_from_centre.png")
    plots.save_figure(fig, path)
    print(f"wrote {path}")


def _print_table(out_dir, order, counts, layer_stats) -> None:
    print(
        f"{sum(counts.values())} attacks ({counts['successful']} successful, "
        f"{counts['failed']} failed); results in {out_dir}"
    )
    print(f"{'layer':<26} {'outcome':<11} {'ratio mean':>10} {'p95':>7} {'spread':>7}")
    for j, layer in enumerate(order):
        for outcome in ("successful", "failed"):
            s = layer_stats[outcome]
            print(
                f"{layer:<26} {outcome:<11} {s['max_ratio_mean'][j]:>10.3f} "
                f"{s['max_ratio_p95'][j]:>7.3f} {s['spread_mean'][j]:>7.1%}"
            )


def _summary(
    csv_path,
    rows,
    counts,
    mismatches,
    distance_by_outcome,
    bin_edges,
    uniform,
    order,
    layer_stats,
) -> dict:
    """summary.json (without its wall time): counts, distances, per-layer numbers."""
    return {
        "model": FLAGS.model,
        "weights": FLAGS.weights,
        "attack_csv": csv_path,
        "signed_maps": FLAGS.signed,
        "layers": FLAGS.layers,
        "spread_threshold": propagation.SPREAD_THRESHOLD,
        "attacks": int(rows["index"].size),
        "successful": counts["successful"],
        "failed": counts["failed"],
        "not_attacked": rows["not_attacked"],
        "pred_after_mismatches": mismatches,
        "distance_from_centre": {
            "metric": f"{DISTANCE_METRIC} from the image centre, in pixels",
            **{
                o: stats.distance_stats(distance_by_outcome[o], bin_edges)
                for o in OUTCOMES
            },
            "uniform_histogram_fractions": [float(f) for f in uniform],
        },
        "per_layer": {
            layer: {
                outcome: {
                    s: rundir.finite_json(layer_stats[outcome][s][j])
                    for s in layer_stats[outcome]
                }
                for outcome in OUTCOMES
            }
            for j, layer in enumerate(order)
        },
        "device": common.device_description(),
    }


def main(argv: list[str]) -> None:
    """Stream all attacks of DIR/attack.csv through the maps and write statistics."""
    del argv
    common.default_batch_size(64)
    start = time.time()
    # Not created here: a mistyped --workdir is not left behind by an error.
    workdir = common.require_workdir(create=False)
    # Data before the model: bad input is reported without compiling anything.
    images, labels = common.load_data().split("test")
    run = attack_csv.load_attack_run(
        workdir, images, labels, model_name=FLAGS.model, weights=FLAGS.weights
    )
    csv_path = run.csv_path
    rows = _attacked(run)
    loaded = common.load_model(FLAGS.model, FLAGS.weights)
    common.check_computes(loaded, images, FLAGS.model, FLAGS.weights)
    config, module, variables, _ = loaded
    filter_fn, _ = propagation.layer_selection(FLAGS.layers)
    shapes = propagation.layer_shapes(module, variables, config.image_shape, filter_fn)
    order = list(shapes)
    state, scalars, predicted = _stream(
        module, variables, shapes, images, rows, FLAGS.batch_size, FLAGS.signed
    )
    success, total = rows["success"], rows["index"].size
    counts = {"failed": int(state["count"][0]), "successful": int(state["count"][1])}
    mismatches = int(np.sum(predicted != rows["pred_after"]))
    # Before anything is written: the model must predict what attack.csv records
    # (the one check of runs recorded without a weights hash; a few near ties
    # may flip on another device).
    attack_csv.require_predictions_match(csv_path, mismatches, total)
    if mismatches:
        logging.warning(
            "%d of %d perturbed images are now predicted differently from the "
            "pred_after column of attack.csv (another model or data set?)",
            mismatches,
            total,
        )

    if rows["pixels"].shape[1] == 1:
        control_states = _controls(
            module, variables, shapes, images, rows, FLAGS.batch_size
        )
    else:
        control_states = {}
        logging.info("no control positions: attacks of more than one pixel")
    generation0 = _generation0(module, variables, images, rows, run.summary, workdir)

    masks = {"successful": success, "failed": ~success, "all": np.ones_like(success)}
    layer_stats = {
        o: propagation.per_outcome_layer_stats(scalars, masks[o]) for o in OUTCOMES
    }
    height, width = images.shape[1:3]
    distances = stats.distance_from_centre(rows["pixels"], height, width)
    bin_edges = stats.distance_bin_edges(height, width)
    distance_by_outcome = {o: distances[masks[o]].reshape(-1) for o in OUTCOMES}
    uniform = stats.uniform_distance_fractions(height, width, bin_edges)

    out_dir = os.path.join(workdir, output_folder())
    storage.makedirs(out_dir)
    mean_maps = _mean_maps(state, counts, order)
    rundir.write_npz(
        os.path.join(out_dir, "mean_maps.npz"),
        {
            "layers": np.array(order),
            "counts": np.array([counts["failed"], counts["successful"]]),
            **{
                f"{key}/{layer}": value
                for key, maps in mean_maps.items()
                for layer, value in maps.items()
            },
        },
    )
    rundir.write_text(
        os.path.join(out_dir, "per_layer.csv"),
        _per_layer_csv(shapes, layer_stats, masks),
    )
    summary = _summary(
        csv_path,
        rows,
        counts,
        mismatches,
        distance_by_outcome,
        bin_edges,
        uniform,
        order,
        layer_stats,
    )
    control_maps = {
        name: _mean_maps(state, counts, order) for name, state in control_states.items()
    }
    report = _claims(
        rows, scalars, order, mean_maps, control_maps, generation0, (height, width)
    )
    # Before claims.json is written: an earlier one's dates count.
    report["provenance"] = claims_json.run_provenance(csv_path, out_dir, start)
    rundir.write_json(os.path.join(out_dir, claims_json.NAME), report)
    table = claims_table(report)
    rundir.write_text(os.path.join(out_dir, "claims.md"), table)
    if control_maps and counts["successful"]:
        fig = plots.mean_maps_figure(
            control_maps["uniform_positions"]["pm_avg/successful"],
            shapes,
            f"Control: mean PM_avg of the {counts['successful']} successful attacks' "
            f"colours put at uniformly drawn positions, {FLAGS.model} (compare "
            "figure 7: what padding geometry alone gives)",
            "colour scale of each layer: 0 .. the maximum of its mean map",
            columns=FLAGS.columns,
            bar_title="mean PM_avg",
        )
        plots.save_figure(
            fig, os.path.join(out_dir, "mean_pm_avg_uniform_positions.png")
        )
    summary["seconds"] = round(time.time() - start, 2)
    rundir.write_json(os.path.join(out_dir, "summary.json"), summary)
    _figures(
        out_dir,
        mean_maps,
        shapes,
        counts,
        layer_stats,
        distance_by_outcome,
        (bin_edges, uniform),
    )
    _print_table(out_dir, order, counts, layer_stats)
    print(table)
