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
- claims.json and claims.md: the paper's sentences as numbers
  (`propmaps_jax.claims`), each with its interval and a verdict by a rule fixed
  in the code: the share of attacks whose max|dFM| / max FM reaches 0.5 and 0.9
  per layer; the mean PM_avg per layer raw and normalised, largest / smallest
  layer; the share of pixels in the central square, for the pixels found and,
  effort-matched, for each attack's best candidate of the initial population
  (recomputed from the run's seed and checked against the attacks that succeeded
  in it); the share of attacks whose last-layer PM_max exceeds half the
  layer's max FM on more than a quarter of the map; and the central-square mass
  of the last layers' mean PM_avg maps beside a control: the same colours at
  uniformly drawn positions (mean_pm_avg_uniform_positions.png).

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
from experiments.runs import attack_csv, integrity, rundir, storage
from propmaps_jax import attack_de, batching, claims, models, propagation, stats
from propmaps_jax.attack.perturb import apply_pixels_batch
from propmaps_jax.errors import PropmapsError

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


def _control(module, variables, shapes, images, rows, batch_size):
    """(running sums, positions (N, 2)) of the attacks' colours put at uniformly
    drawn positions (one per test image, from the seed), outcomes kept."""
    height, width = images.shape[1:3]
    key = jax.random.fold_in(jax.random.key(FLAGS.seed), CONTROL_STREAM)
    positions = claims.uniform_positions(key, rows["index"], height, width)
    moved = rows["pixels"].copy()
    moved[:, 0, :2] = positions
    state, _, _ = _stream(
        module,
        variables,
        shapes,
        images,
        {**rows, "pixels": moved},
        batch_size,
        FLAGS.signed,
    )
    return state, positions


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
    """claims.json: the paper's sentences as numbers (see propmaps_jax.claims)."""
    height, width = shape
    success = rows["success"]
    outcomes = {"successful": success, "failed": ~success, "all": success | ~success}
    reach = {
        o: claims.reach_shares(scalars["max_ratio"][m]) for o, m in outcomes.items()
    }
    close = f"{claims.CLOSE_TO_MAX:g}"
    normalisations = {
        "none (mean abs dFM)": scalars["mean_abs_diff"],
        "divided by the layer's mean abs FM": scalars["mean_abs_diff"]
        / scalars["mean_abs_fm"],
        "divided by the layer's max FM": scalars["mean_abs_diff"] / scalars["fm_max"],
    }
    same = {}
    for name, values in normalisations.items():
        profiles = {o: claims.layer_profile(values[m]) for o, m in outcomes.items()}
        same[name] = {
            **profiles,
            "verdict": claims.same_across_layers_verdict(profiles["successful"])
            if success.any()
            else "undecided",
        }
    centre = {
        "central_square": (
            f"Chebyshev distance from the centre below {claims.CENTRE_SIDE_FRACTION:g}"
            f" x half the side ({int(claims.central_square(height, width).sum())} of "
            f"{height * width} positions)"
        ),
        "found_pixels": claims.centre_comparison(
            rows["pixels"], success, height, width
        ),
    }
    if isinstance(generation0, str):
        centre["generation0"] = {"not_computed": generation0}
    else:
        at0 = success & (rows["generations"] == 0)
        same_pixel = np.all(generation0["reported"][at0] == rows["pixels"][at0], (1, 2))
        centre["generation0"] = {
            **claims.centre_comparison(generation0["best"], success, height, width),
            "what": "each attack's best candidate (lowest p(true)) of its initial "
            "population, which every attack evaluated, whatever its outcome",
            "check": {
                "succeeded_at_generation0": int(at0.sum()),
                "recorded_pixel_recomputed": int(same_pixel.sum()),
            },
        }
    last = len(order) - 1
    spread = {}
    for o, m in outcomes.items():
        strong = claims.share(scalars["spread_strong"][m, last] > claims.QUARTER)
        weak = claims.share(scalars["spread"][m, last] > claims.QUARTER)
        spread[o] = {
            f"PM_max > {claims.STRONG_FRACTION:g} max FM": strong,
            f"PM_max > {propagation.SPREAD_THRESHOLD:g} max FM": weak,
            "mean_spread_strong": claims.bootstrap_mean(
                scalars["spread_strong"][m, last]
            ),
        }
    concentration = {}
    for o in ("successful", "failed"):
        per_layer = {}
        for layer in order:
            actual = claims.centre_mass(mean_maps[f"pm_avg/{o}"][layer])
            control = (
                claims.centre_mass(control_maps[f"pm_avg/{o}"][layer])
                if control_maps
                else float("nan")
            )
            positions = claims.central_square(*mean_maps[f"pm_avg/{o}"][layer].shape)
            level = float(np.mean(mean_maps[f"pm_avg/{o}"][layer]))
            control_level = (
                float(np.mean(control_maps[f"pm_avg/{o}"][layer]))
                if control_maps
                else float("nan")
            )
            per_layer[layer] = {
                "attacks": actual,
                "uniform_positions": control,
                "share_of_positions": float(positions.mean()),
                # How strong, not where: mean PM_avg over the map, attacks and control.
                "mean_pm_avg": level,
                "mean_pm_avg_uniform_positions": control_level,
            }
        top = per_layer[order[last]]
        concentration[o] = {
            "central_mass_share": per_layer,
            "verdict_last_layer": claims.centre_concentration_verdict(
                top["attacks"], top["uniform_positions"], top["share_of_positions"]
            ),
        }
    return {
        "rules": claims.VERDICT_RULES,
        "maps": {"signed": FLAGS.signed, "layers": FLAGS.layers},
        "layers": order,
        "counts": {o: int(m.sum()) for o, m in outcomes.items()},
        "close_to_max": {
            "shares": reach,
            "verdict": claims.close_to_max_verdict(reach["successful"][close]),
        },
        "same_across_layers": same,
        "centre": centre,
        "quarter_of_last_map": {
            "layer": order[last],
            "by_outcome": spread,
            "verdict": claims.quarter_verdict(
                spread["successful"][f"PM_max > {claims.STRONG_FRACTION:g} max FM"]
            ),
        },
        "centre_concentration": concentration,
    }


def _pct(prop: dict) -> str:
    return report_tables.short_cell(prop, empty="n/a", unit="%")


def claims_table(report: dict) -> str:
    """claims.md: the rules, then one table row per sentence and statistic."""
    order, last = report["layers"], report["layers"][-1]
    lines = [
        f"Maps: {'signed FM - FM_adv' if report['maps']['signed'] else '|FM - FM_adv|'}"
        f" of {report['maps']['layers']} layers; attacks: "
        + ", ".join(f"{n} {o}" for o, n in report["counts"].items()),
        "",
        "Verdict rules (fixed in propmaps_jax/analysis/claims.py before the numbers):",
        "",
        *(f"- {name}: {rule}" for name, rule in report["rules"].items()),
        "",
        "| sentence | statistic | successful | failed | verdict |",
        "| --- | --- | --- | --- | --- |",
    ]
    shares = report["close_to_max"]["shares"]
    verdict = report["close_to_max"]["verdict"]
    for t in shares["successful"]:
        best = int(np.argmax([s["rate"] or 0 for s in shares["successful"][t]]))
        for j in sorted({best, len(order) - 1}):
            lines.append(
                rf"| close to max | max\|dFM\|/max FM >= {t}, {order[j]} | "
                f"{_pct(shares['successful'][t][j])} | {_pct(shares['failed'][t][j])} "
                f"| {verdict if t == '0.9' and j == best else ''} |"
            )
    for name, entry in report["same_across_layers"].items():
        cells = []
        for o in ("successful", "failed"):
            r = entry[o]["largest_over_smallest"]
            f = entry[o]["last_over_first"]
            cells.append(
                f"largest/smallest {r['ratio']:.3g} ({r['ci_low']:.3g}–"
                f"{r['ci_high']:.3g}); last/first {f['ratio']:.3g}"
            )
        lines.append(
            f"| PM avg same across layers | {name} | {cells[0]} | {cells[1]} | "
            f"{entry['verdict']} |"
        )
    centre = report["centre"]
    for key, what in (("found_pixels", "found pixel"), ("generation0", "gen-0 best")):
        c = centre[key]
        if "not_computed" in c:
            lines.append(
                f"| successful near centre | {what} | not computed: "
                f"{c['not_computed']} | | |"
            )
            continue
        lines.append(
            f"| successful near centre | {what} in central square (uniform "
            f"{c['uniform_share']:.0%}) | {_pct(c['successful'])} | "
            f"{_pct(c['failed'])} | {c['verdict']} |"
        )
    q = report["quarter_of_last_map"]
    for name in q["by_outcome"]["successful"]:
        if name.startswith("mean"):
            continue
        lines.append(
            f"| more than a quarter of last map | {name} on > 25% of {last} | "
            f"{_pct(q['by_outcome']['successful'][name])} | "
            f"{_pct(q['by_outcome']['failed'][name])} | "
            f"{q['verdict'] if name.startswith('PM_max > 0.5') else ''} |"
        )
    cc = report["centre_concentration"]
    cells = []
    for o in ("successful", "failed"):
        m = cc[o]["central_mass_share"][last]
        cells.append(
            f"{m['attacks']:.1%} (uniform positions {m['uniform_positions']:.1%}); "
            f"mean PM avg {m['mean_pm_avg']:.3g} (uniform positions "
            f"{m['mean_pm_avg_uniform_positions']:.3g})"
        )
    lines.append(
        f"| mean maps concentrate in centre | central mass share of mean PM avg, "
        f"{last} (central square: "
        f"{cc['successful']['central_mass_share'][last]['share_of_positions']:.0%} "
        f"of positions) | {cells[0]} | "
        f"{cells[1]} | {cc['successful']['verdict_last_layer']} |"
    )
    if "check" in centre.get("generation0", {}):
        ch = centre["generation0"]["check"]
        lines += [
            "",
            f"Generation-0 recomputation: {ch['recorded_pixel_recomputed']} of the "
            f"{ch['succeeded_at_generation0']} attacks that succeeded in their "
            "initial population give the recorded pixel.",
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
        control_state, _ = _control(
            module, variables, shapes, images, rows, FLAGS.batch_size
        )
    else:
        control_state = None
        logging.info("no uniform-position control: attacks of more than one pixel")
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
    control_maps = (
        _mean_maps(control_state, counts, order) if control_state is not None else {}
    )
    report = _claims(
        rows, scalars, order, mean_maps, control_maps, generation0, (height, width)
    )
    rundir.write_json(os.path.join(out_dir, "claims.json"), report)
    table = claims_table(report)
    rundir.write_text(os.path.join(out_dir, "claims.md"), table)
    if control_maps and counts["successful"]:
        fig = plots.mean_maps_figure(
            control_maps["pm_avg/successful"],
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
