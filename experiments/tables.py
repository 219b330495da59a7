"""The locality study's tables: Table 1 beside the paper's, and per-attack rows.

table1_markdown / table1_csv: DIR/table1.md and DIR/table1.csv of the locality
experiment; locality_csv: DIR/<model>/locality.csv, one row per successful attack.
"""

from __future__ import annotations

import csv
import io
from typing import Any

from propmaps_jax import stats

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


def cell(prop: dict[str, Any]) -> str:
    """One table cell: 'rate (count; 95% Wilson interval)'."""
    return stats.format_proportion(prop)


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
        f"CIFAR-10 test set, {samples} "
        f"(sample={settings['sample']}, seed {settings['seed']}); one-pixel attack by "
        f"differential evolution, population {settings['attack']['population']}, "
        f"{settings['attack']['generations']} generations. Random and nearby: the "
        "colour of each successful attack is put once per image at another position "
        "of the clean image (nearby: one of the 8 adjacent pixels inside the image; "
        "random: any other pixel), so their denominator is the number of successful "
        "attacks. Each cell: rate (count; 95% Wilson interval).",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for key, label in ROWS:
        cells = [label, *(cell(results[n][key]) for n in names)]
        for n in paper_cols:
            if key in PAPER_KEYS:
                rate = PAPER_TABLE1[n][PAPER_KEYS[key]]
                text = f"{rate:.1%}" if key != "original_all" else f"{rate:.0%}"
                if key == "original_all":
                    text += f" ({PAPER_TABLE1[n]['successes']}/5000)"
                cells.append(text)
            else:
                cells.append("not reported")
        lines.append("| " + " | ".join(cells) + " |")
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
        "| distance | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for i in range(settings["max_distance"]):
        cells = [str(i + 1) + (" (all neighbours)" if i == 0 else "")]
        cells += [cell(results[n]["distance"][i]["pooled"]) for n in names]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(
        "| random pixel (baseline) | "
        + " | ".join(cell(results[n]["random"]) for n in names)
        + " |"
    )
    return "\n".join(lines) + "\n"


def table1_csv(results: dict[str, dict]) -> str:
    """DIR/table1.csv: a row per Table 1 row, rate/count/interval columns per model."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    names = list(results)
    fields = ("rate", "successes", "n", "ci_low", "ci_high", "paper_rate")
    writer.writerow(["row"] + [f"{n}_{f}" for n in names for f in fields])
    for key, label in ROWS:
        row: list[Any] = [label]
        for n in names:
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
        writer.writerow(row)
    return buffer.getvalue()


def locality_csv(table, succ_rows, study) -> str:
    """DIR/<model>/locality.csv: one row per successful attack."""
    distances = study["distances"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    max_d = int(distances.max())
    writer.writerow(
        ["index", "label", "row", "col", "r", "g", "b"]
        + ["nearby_row", "nearby_col", "nearby_pred", "nearby_success"]
        + ["random_row", "random_col", "random_pred", "random_success"]
        + [f"ring{d}_{what}" for d in range(1, max_d + 1) for what in ("n", "success")]
    )
    for i, row in enumerate(succ_rows):
        ring = []
        for d in range(1, max_d + 1):
            at_d = distances == d
            ring += [
                int(study["ring_inside"][i, at_d].sum()),
                int(study["ring_success"][i, at_d].sum()),
            ]
        writer.writerow(
            [int(table["index"][row]), int(table["label"][row])]
            + [int(v) for v in table["pixels"][row, 0]]
            + [int(v) for v in study["nearby_rc"][i]]
            + [int(study["nearby_pred"][i]), int(study["nearby_success"][i])]
            + [int(v) for v in study["random_rc"][i]]
            + [int(study["random_pred"][i]), int(study["random_success"][i])]
            + ring
        )
    return buffer.getvalue()
