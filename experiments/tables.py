"""The locality study's per-attack data files.

locality_csv / read_locality_csv: DIR/<model>/locality.csv, one row per successful
attack; controls_csv: DIR/<model>/controls.csv, one row per attacked image. The
report tables (table1.md, table1.csv, the controls' tables) are in
experiments/report/tables.py.
"""

from __future__ import annotations

import csv
import io
import os

import numpy as np

from experiments import rundir
from propmaps_jax.errors import PropmapsError


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


# ----- DIR/<model>/locality.csv read back, and the controls' tables -------------

LOCALITY_BASE = (
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


def read_locality_csv(path: str, max_distance: int) -> dict[str, np.ndarray]:
    """DIR/<model>/locality.csv as int arrays; ring_n/ring_success (N, max_distance).

    A file without the columns of this version (an older run) or unreadable is
    refused with one line saying what to re-run.
    """
    rerun = (
        f"delete {os.path.join(os.path.dirname(path), 'locality.json')} and run the "
        "locality experiment again on this --workdir (it reuses attack.csv)"
    )
    rings = [
        f"ring{d}_{what}"
        for d in range(1, max_distance + 1)
        for what in ("n", "success")
    ]
    try:
        with open(path, newline="") as f:
            reader = csv.reader(f)
            header = next(reader, [])
            rows = list(reader)
    except OSError as e:
        raise PropmapsError(f"cannot read {path} ({e.strerror}): {rerun}") from None
    missing = [c for c in (*LOCALITY_BASE, *rings) if c not in header]
    if missing:
        raise PropmapsError(
            f"{path} is from an older version or another --max_distance (no "
            f"{', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}): {rerun}"
        )
    try:
        table = np.array(rows, dtype=np.int64).reshape(len(rows), len(header))
    except ValueError:
        raise PropmapsError(
            f"{path} holds a value that is not an integer: {rerun}"
        ) from None
    out = {c: table[:, header.index(c)] for c in LOCALITY_BASE}
    for what in ("n", "success"):
        out[f"ring_{what}"] = np.stack(
            [
                table[:, header.index(f"ring{d}_{what}")]
                for d in range(1, max_distance + 1)
            ],
            axis=1,
        ).reshape(len(rows), max_distance)
    if np.any(out["ring_success"] > out["ring_n"]) or np.any(
        ~np.isin(out["nearby_success"], (0, 1))
        | ~np.isin(out["random_success"], (0, 1))
    ):
        raise PropmapsError(f"{path} holds inconsistent counts: {rerun}")
    return out


CONTROLS_COLUMNS = (
    "index",
    "success",
    "generations",
    "generation0",
    "margin",
    "margin_quartile",
    "own_r",
    "own_g",
    "own_b",
    "own_random_colour_success",
    "nearby_colour_r",
    "nearby_colour_g",
    "nearby_colour_b",
    "nearby_random_colour_success",
    "context_row",
    "context_col",
    "context_found",
    "context_candidates",
    "context_distance",
    "context_success",
    "nearby_context_distance",
)


def controls_csv(attacked: dict, per_attack: dict, controls) -> str:
    """DIR/<model>/controls.csv: one row per attacked image (controls: successes)."""
    rows = []
    position = {int(i): j for j, i in enumerate(per_attack["index"])}
    for k, index in enumerate(attacked["index"]):
        row = [
            int(index),
            int(attacked["success"][k]),
            int(attacked["generations"][k]),
            int(attacked["generations"][k] == 0) if attacked["success"][k] else "",
            f"{attacked['margin'][k]:.6f}",
            int(attacked["quartile"][k]) + 1,
        ]
        j = position.get(int(index))
        if j is None:
            rows.append(row + [""] * (len(CONTROLS_COLUMNS) - len(row)))
            continue
        row += [int(v) for v in controls.own_colour[j]]
        row.append(int(per_attack["own_random_colour_success"][j]))
        row += [int(v) for v in controls.nearby_colour[j]]
        row.append(int(per_attack["nearby_random_colour_success"][j]))
        row += [int(v) for v in controls.context_rc[j]]
        row += [int(controls.context_found[j]), int(controls.context_candidates[j])]
        row.append(f"{controls.context_distance[j]:.3f}")
        row.append(
            int(per_attack["context_success"][j]) if controls.context_found[j] else ""
        )
        row.append(f"{controls.nearby_context_distance[j]:.3f}")
        rows.append(row)
    return rundir.csv_text(list(CONTROLS_COLUMNS), rows)
