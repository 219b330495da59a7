"""The locality study's report tables: Table 1 beside the paper's, the controls.

table1_markdown / table1_csv: DIR/table1.md and DIR/table1.csv of the locality
experiment; controls_markdown / controls_table_csv: the controls' section of
DIR/table1.md and DIR/controls.csv; seeds_markdown: the seeds' table. The
per-attack data files (locality.csv, controls.csv) are in experiments/tables.py.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from propmaps_jax import stats
from propmaps_jax.analysis import locality_controls as lc
from propmaps_jax.results import _io

# The paper's Table 1 (5,000 CIFAR-10 test samples): original / random / nearby.
PAPER_TABLE1 = {
    "lenet": {"original": 0.59, "random": 0.049, "nearby": 0.331, "successes": 2934},
    "resnet": {"original": 0.33, "random": 0.031, "nearby": 0.313, "successes": 1638},
}
PAPER_NAMES = {"lenet": "LeNet", "resnet": "ResNet"}
# Our Table 1 rows that the paper reports, and its key for each.
PAPER_KEYS = {"original_all": "original", "random": "random", "nearby": "nearby"}
ROWS = (
    ("original_all", "original one-pixel attack (over all samples)"),
    (
        "original_correct",
        "original one-pixel attack (over correctly classified samples)",
    ),
    ("random", "on random pixels"),
    ("nearby", "on nearby pixels"),
)


NETWORK_ROW = ("network_nearby", "on nearby pixels in the network's coordinates")


def _rows(results: dict[str, dict]) -> tuple:
    """Table 1's rows; the network-space nearby row when a model has one."""
    if any("network_nearby" in r for r in results.values()):
        return (*ROWS, NETWORK_ROW)
    return ROWS


def markdown_row(cells: list[str]) -> str:
    """One Markdown table row: '| a | b |'."""
    return "| " + " | ".join(cells) + " |"


def markdown_header(header: list[str]) -> list[str]:
    """A Markdown table's header row and the separator under it."""
    return [markdown_row(header), "|" + "---|" * len(header)]


def cell(prop: dict[str, Any]) -> str:
    """One table cell: 'rate (count; 95% Wilson interval)'."""
    return stats.format_proportion(prop)


def _split_words(settings: dict[str, Any]) -> str:
    """Which images a run attacked, from its recorded data source."""
    if str(settings.get("dataset", "")).endswith("[train split]"):
        return (
            "**training images** (`--data_split=train`: seen by the model in "
            "training, unlike the paper's test images)"
        )
    return "test set"


def table1_markdown(results: dict[str, dict], settings: dict[str, Any]) -> str:
    """DIR/table1.md: ours next to the paper's, plus the success-vs-distance table."""
    names = list(results)
    counts = settings["num_samples"]
    if not isinstance(counts, dict):  # locality.json of earlier versions
        counts = {n: counts for n in names}
    if len(set(counts.values())) == 1:
        samples = f"{next(iter(counts.values()))} samples"
        header = ["", *(f"{n} (ours)" for n in names)]
    else:
        samples = ", ".join(f"{n}: {counts[n]} samples" for n in names)
        header = ["", *(f"{n} (ours, {counts[n]} samples)" for n in names)]
    paper_cols = [n for n in names if n in PAPER_TABLE1]
    header += [f"{PAPER_NAMES[n]} (paper)" for n in paper_cols]
    lines = [
        "# Table 1: success rate of the one-pixel attack and of its pixel moved",
        "",
        f"CIFAR-10 {_split_words(settings)}, {samples} "
        f"(sample={settings['sample']}, seed {settings['seed']}); one-pixel attack by "
        f"differential evolution, population {settings['attack']['population']}, "
        f"{settings['attack']['generations']} generations. Random and nearby: the "
        "colour of each successful attack is put once per image at another position "
        "of the clean image (nearby: one of the 8 adjacent pixels inside the image; "
        "random: any other pixel), so their denominator is the number of successful "
        "attacks. Each cell: rate (count; 95% Wilson interval).",
        "",
        *markdown_header(header),
    ]
    for key, label in _rows(results):
        cells = [
            label,
            *(cell(results[n][key]) if key in results[n] else "n/a" for n in names),
        ]
        for n in paper_cols:
            if key in PAPER_KEYS:
                rate = PAPER_TABLE1[n][PAPER_KEYS[key]]
                text = f"{rate:.1%}" if key != "original_all" else f"{rate:.0%}"
                if key == "original_all":
                    text += f" ({PAPER_TABLE1[n]['successes']}/5000)"
                cells.append(text)
            else:
                cells.append("not reported")
        lines.append(markdown_row(cells))
    lines += [
        "",
        "Accuracy on the samples: "
        + "; ".join(f"{n} {cell(results[n]['accuracy_on_samples'])}" for n in names)
        + ". Only correctly classified samples are attacked.",
        "",
        "## Beyond the paper: success rate vs Chebyshev distance",
        "",
        "The colour of each successful attack put at every position at Chebyshev "
        "distance d inside the image (d = 1: all 8 neighbours). Cells: successes over "
        "all (image, position) pairs. Positions of one image are not independent, "
        "so these Wilson intervals are narrower than the true uncertainty.",
        "",
        *markdown_header(["distance", *names]),
    ]
    for i in range(settings["max_distance"]):
        cells = [str(i + 1) + (" (all neighbours)" if i == 0 else "")]
        cells += [cell(results[n]["distance"][i]["pooled"]) for n in names]
        lines.append(markdown_row(cells))
    lines.append(
        markdown_row(
            ["random pixel (baseline)", *(cell(results[n]["random"]) for n in names)]
        )
    )
    permuted = [n for n in names if "network_distance" in results[n]]
    if permuted:
        lines += [
            "",
            "The same in the network's coordinates (pixel-permuted models): the "
            "colour put at every image position that the model's permutation places "
            "at Chebyshev distance d from the attacked pixel in its input.",
            "",
            *markdown_header(["distance (network space)", *permuted]),
        ]
        for i in range(settings["max_distance"]):
            cells = [str(i + 1)]
            cells += [
                cell(results[n]["network_distance"][i]["pooled"]) for n in permuted
            ]
            lines.append(markdown_row(cells))
    if any(r.get("controls") for r in results.values()):
        lines += ["", controls_markdown(results, settings)]
    if any(r.get("within_image") for r in results.values()):
        lines += ["", within_image_markdown(results)]
    return "\n".join(lines) + "\n"


def _ci(value: dict | None, percent: bool = True) -> str:
    """'estimate (lo to hi)' of an interval dict; percentage points when `percent`."""
    if not value or value.get("estimate") is None:
        return "n/a"
    scale, digits = (100, 1) if percent else (1, 3)
    lo = "?" if value.get("lo") is None else f"{scale * value['lo']:.{digits}f}"
    hi = "?" if value.get("hi") is None else f"{scale * value['hi']:.{digits}f}"
    return f"{scale * value['estimate']:.{digits}f} ({lo} to {hi})"


def within_image_markdown(results: dict[str, dict]) -> str:
    """The within-image analysis (`propmaps_jax.analysis.content`) of each model."""
    names = [n for n in results if results[n].get("within_image")]
    lines = [
        "## Within images: intervals clustered by image, image fixed effects",
        "",
        "Rates in %, differences in points, each with a 95% interval from a "
        "bootstrap over images (positions of one image are not independent). "
        "Distance coefficients: conditional logistic regression of ring success "
        "(d = 1..D) on Chebyshev distance with one stratum per image (log-odds per "
        "pixel), alone and with the colour difference between the moved-to and the "
        "attacked pixel's original colours (RGB distance per 100) as a covariate; "
        "under the image-content reading distance adds little once that is in.",
        "",
        *markdown_header(
            [
                "model",
                "space",
                "nearby",
                "random",
                "nearby - random",
                "distance",
                "distance, colour-adjusted",
                "colour",
                "informative images",
            ]
        ),
    ]
    for name in names:
        record = results[name]["within_image"]
        moves = record["moves"]
        for space, data in record["spaces"].items():
            fixed = data["fixed_effects"]
            nearby_key = "nearby" if space == "image" else "network_nearby"
            difference = moves["differences"].get(f"{nearby_key} - random")
            fits = [
                _ci(fixed[k], percent=False)
                if fixed.get("not_fitted") is None
                else f"not fitted: {fixed['not_fitted']}"
                for k in ("distance", "colour_adjusted_distance", "colour")
            ]
            lines.append(
                markdown_row(
                    [
                        name,
                        space,
                        _ci(moves["rates"].get(nearby_key)),
                        _ci(moves["rates"].get("random")),
                        _ci(difference),
                        *fits,
                        str(fixed["images_informative"]),
                    ]
                )
            )
    lines += [
        "",
        "Image-content controls (bootstrap over images): another successful "
        "attack's colour (the attacks' own colour distribution, not uniform RGB) at "
        "the nearby position; the attack's colour at a position matched on 3x3 "
        "context and on distance from the centre (attacks without one are dropped); "
        "nearby - random per stratum of the clean margin's logit (Q1: least "
        "confident) and of generation 0 / search.",
        "",
        *markdown_header(
            [
                "model",
                "nearby - other attack's colour at nearby",
                "context+centre matched: rate",
                "nearby - matched",
                "matched - random",
                "dropped",
            ]
        ),
    ]
    for name in names:
        c = results[name]["within_image"].get("controls")
        if not c:
            continue
        m = c["centre_matched"]
        dropped = "n/a" if m["drop_rate"] is None else f"{100 * m['drop_rate']:.0f}%"
        lines.append(
            markdown_row(
                [
                    name,
                    _ci(c["nearby_minus_other_colour_at_nearby"]),
                    _ci(m["rate"]),
                    _ci(m["nearby_minus"]),
                    _ci(m["minus_random"]),
                    dropped,
                ]
            )
        )
    lines += [
        "",
        *markdown_header(["model", "stratum", "attacks", "nearby - random (points)"]),
    ]
    for name in names:
        c = results[name]["within_image"].get("controls")
        for row in (c or {}).get("nearby_minus_random_by_stratum", []):
            lines.append(markdown_row([name, row["stratum"], str(row["n"]), _ci(row)]))
    comparison = next(
        (
            results[n].get("nearby_comparison")
            for n in names
            if results[n].get("nearby_comparison")
        ),
        None,
    )
    if comparison:
        lines += [
            "",
            "The nearby rate across the models of this run (the paper: about the "
            "same across networks); differences with one bootstrap over test images, "
            "'zero' within ±5 points:",
            "",
            *markdown_header(["difference", "points (95% CI)", "class"]),
        ]
        for pair, d in comparison["differences"].items():
            lines.append(markdown_row([pair, _ci(d), d["class"]]))
    return "\n".join(lines)


def table1_csv(results: dict[str, dict]) -> str:
    """DIR/table1.csv: a row per Table 1 row, rate/count/interval columns per model."""
    names = list(results)
    fields = ("rate", "successes", "n", "ci_low", "ci_high", "paper_rate")
    rows = []
    for key, label in _rows(results):
        row: list[Any] = [label]
        for n in names:
            if key not in results[n]:
                row += [""] * len(fields)
                continue
            prop = results[n][key]
            paper = PAPER_TABLE1.get(n, {}).get(PAPER_KEYS.get(key, ""), "")
            row += [
                "" if prop["rate"] is None else f"{prop['rate']:.6f}",
                prop["successes"],
                prop["n"],
                f"{prop['ci_low']:.6f}",
                f"{prop['ci_high']:.6f}",
                paper,
            ]
        rows.append(row)
    return _io.csv_text(["row"] + [f"{n}_{f}" for n in names for f in fields], rows)


def _rate(prop: dict | None) -> str:
    return "—" if prop is None else stats.short_cell(prop)


def _p(value: float) -> str:
    return f"{value:.2g}" if value >= 1e-4 else f"{value:.0e}"


def _coefficient(model: dict, name: str) -> str:
    if model.get("too_few"):
        return f"not fitted: {model['images']} attacks (< {lc.MIN_STRATUM})"
    c = model[name]
    if c["estimate"] is None:
        return "n/a"
    interval = (
        "no interval"
        if c["ci_low"] is None
        else f"{c['ci_low']:+.3f} to {c['ci_high']:+.3f}"
    )
    return f"{c['estimate']:+.3f} ({interval})"


def controls_markdown(results: dict[str, dict], settings: dict[str, Any]) -> str:
    """The controls' section of DIR/table1.md: strata, controls, model, verdict."""
    lines = [
        "## Controls: receptive field or fragile image?",
        "",
        "Successful attacks split by fragility: found in DE's initial population "
        "(generation 0) or by search, and by the clean image's margin p(true) − max "
        "p(other) in quartiles over the attacked images (Q1: the least confident). "
        "Each cell: rate (count; 95% Wilson interval in %). Original: the attack's "
        "success over the attacked images of the quartile. Controls, one seeded draw "
        "per successful attack: a random colour at the attack's position; a random "
        "colour at the nearby move's position; the attack's colour at a random "
        "position whose 3x3 neighbourhood is within "
        f"{lc.CONTEXT_TOLERANCE:g} (mean |difference| over the 27 values, 0..255) "
        "of the attack position's and at Chebyshev distance >= "
        f"{lc.CONTEXT_MIN_DISTANCE} (context-matched; over the attacks where one "
        "exists). Nearby vs random: nearby-only / random-only successes on the same "
        "images and McNemar's exact p. Ring cells pool image-position pairs (too "
        "narrow intervals; the distance model below resamples images).",
        "",
    ]
    for name, res in results.items():
        controls = res.get("controls")
        if controls is None:
            continue
        strata = controls["strata"]
        max_d = len(strata["all"]["rings"])
        header = ["stratum", "attacks", "original", *(m for m, _ in lc.MOVES)]
        header += [f"ring d={d}" for d in range(1, max_d + 1)]
        header += ["nearby-only / random-only (p)"]
        lines += [
            f"### {name}",
            "",
            "Columns: " + "; ".join(f"{m}: {label}" for m, label in lc.MOVES) + ".",
            "",
            *markdown_header(header),
        ]
        for stratum in lc.STRATA:
            s = strata[stratum]
            t = s["nearby_vs_random"]
            cells = [stratum, str(s["successful_attacks"])]
            cells.append(_rate(s.get("original_correct")))
            cells += [_rate(s[m]) for m, _ in lc.MOVES]
            cells += [_rate(r) for r in s["rings"]]
            cells.append(
                f"{t['only_first']} / {t['only_second']} ({_p(t['mcnemar_p'])})"
            )
            lines.append(markdown_row(cells))
        context = controls["context"]
        lines += [
            "",
            f"Context-matched position: none within the tolerance for "
            f"{context['not_found']} of {context['successful_attacks']} attacks; "
            f"median {_num(context['median_candidates'])} candidates; median context "
            f"distance of the drawn position {_num(context['median_distance_drawn'])}, "
            f"of the nearby move's position {_num(context['median_distance_nearby'])}.",
            "",
            "| control | first vs second | only first / only second | difference "
            "| McNemar p | wins |",
            "|---|---|---|---|---|---|",
        ]
        for c in controls["controls"]:
            wins = {"first": c["first"], "second": c["second"]}.get(
                c["winner"], "no difference shown"
            )
            lines.append(
                f"| {c['id']}: {c['meaning']} | {c['first']} vs {c['second']} | "
                f"{c['only_first']} / {c['only_second']} (n = {c['n']}) | "
                f"{_signed_pp(c['difference'])} | {_p(c['mcnemar_p'])} | {wins} |"
            )
        models = controls["distance_models"]
        lines += [
            "",
            "Distance model: logistic regression of success over the image-position "
            f"pairs of rings d = 1..{max_d} (binomial per image and ring) and the "
            "random move (at its own distance); coefficients in log-odds per unit, "
            f"95% bootstrap intervals over images ({controls['settings']['bootstrap']} "
            f"resamples; fitted on at least {lc.MIN_STRATUM} successful attacks; "
            "failed fits: "
            + ", ".join(f"{k} {m['bootstrap_failed']}" for k, m in models.items())
            + ").",
            "",
            "| model | distance | margin | generation 0 |",
            "|---|---|---|---|",
            f"| success ~ distance | {_coefficient(models['unadjusted'], 'distance')} "
            "| | |",
            markdown_row(
                [
                    "success ~ distance + margin + generation 0",
                    *(
                        _coefficient(models["adjusted"], k)
                        for k in ("distance", "margin", "generation0")
                    ),
                ]
            ),
            "",
            f"**Verdict ({name}): locality beyond fragility is "
            f"{controls['verdict']['outcome']}** — "
            + "; ".join(controls["verdict"]["reasons"])
            + " (strata of at least "
            f"{lc.MIN_STRATUM} attacks, the ones the rule counts: "
            + (", ".join(controls["verdict"]["strata_counted"]) or "none")
            + ").",
            "",
        ]
    lines += [lc.VERDICT_RULE, ""]
    return "\n".join(lines)


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def _signed_pp(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:+.1f} pp"


def controls_table_csv(results: dict[str, dict]) -> str:
    """DIR/controls.csv: one row per model, stratum and rate (long format)."""
    rows = []
    for name, res in results.items():
        controls = res.get("controls")
        if controls is None:
            continue
        for stratum, s in controls["strata"].items():
            measures = [(m, s[m]) for m, _ in lc.MOVES]
            measures += [(f"ring{d + 1}", r) for d, r in enumerate(s["rings"])]
            if "original_correct" in s:
                measures.append(("original_correct", s["original_correct"]))
            t = s["nearby_vs_random"]
            for measure, p in measures:
                rows.append(
                    [name, stratum, measure, p["successes"], p["n"]]
                    + [
                        "" if p["rate"] is None else f"{p['rate']:.6f}",
                        f"{p['ci_low']:.6f}",
                        f"{p['ci_high']:.6f}",
                        t["only_first"],
                        t["only_second"],
                        f"{t['mcnemar_p']:.6g}",
                    ]
                )
    header = ["model", "stratum", "measure", "successes", "n", "rate", "ci_low"]
    header += ["ci_high", "nearby_only", "random_only", "mcnemar_p"]
    return _io.csv_text(header, rows)


SEED_ROWS = (
    ("original_all", "original attack, over all samples"),
    ("original_correct", "original attack, over correctly classified samples"),
    ("random", "on random pixels"),
    ("nearby", "on nearby pixels"),
)


def seeds_markdown(records: dict[int, dict]) -> str:
    """Table 1 of one model under several seeds: {seed: its locality.json record}.

    Each cell: rate (count; 95% Wilson interval); the last column: mean and
    standard deviation of the rates over the seeds (run-to-run spread), to set
    beside the intervals (sampling uncertainty).
    """
    seeds = sorted(records)
    header = ["", *(f"seed {s}" for s in seeds), "mean ± sd over seeds"]
    lines = markdown_header(header)

    def row(label: str, props: list[dict]) -> None:
        rates = np.array([p["rate"] for p in props], np.float64)
        spread = (
            f"{100 * rates.mean():.1f} ± {100 * rates.std(ddof=1):.1f}%"
            if len(rates) > 1
            else f"{100 * rates.mean():.1f}%"
        )
        lines.append(markdown_row([label, *map(cell, props), spread]))

    for key, label in SEED_ROWS:
        row(label, [records[s][key] for s in seeds])
    max_d = min(len(records[s]["distance"]) for s in seeds)
    for d in range(max_d):
        row(
            f"ring d = {d + 1} (pooled pairs)",
            [records[s]["distance"][d]["pooled"] for s in seeds],
        )
    if all(records[s].get("controls") for s in seeds):
        for stratum in ("generation 0", "search"):
            row(
                f"nearby, {stratum}",
                [records[s]["controls"]["strata"][stratum]["nearby"] for s in seeds],
            )
        lines.append(
            "| verdict (locality beyond fragility) | "
            + " | ".join(records[s]["controls"]["verdict"]["outcome"] for s in seeds)
            + " | |"
        )
    return "\n".join(lines) + "\n"


def table1_summary(table1: str, path: str) -> str:
    """What the locality job prints last: Table 1 itself (table1.md up to its first
    section), each model's verdict line, and where the full tables are."""
    head = table1.split("\n## ", 1)[0].rstrip()
    verdicts = [line for line in table1.splitlines() if line.startswith("**Verdict")]
    return "\n\n".join([head, *verdicts, f"All the tables and controls: {path}"])
