"""DIR/<model>/controls.csv: the locality controls, one row per attacked image.

The controls' report tables (their section of table1.md, DIR/controls.csv) are in
`experiments.report.tables`; the controls themselves in
`propmaps_jax.analysis.locality_controls`.
"""

from __future__ import annotations

from propmaps_jax.results import _io

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
    return _io.csv_text(list(CONTROLS_COLUMNS), rows)
