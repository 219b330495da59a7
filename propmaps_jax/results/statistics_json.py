"""summary.json of the statistics experiment: the numbers of a `StatisticsStudy`.

The study (`propmaps_jax.analysis.statistics.study_attacks`) keeps arrays; this is
the one place that says which of them a statistics folder's summary.json holds
and how they are written (finite floats, NaN as null), so that a user of the
package writes the same file as the experiment.
"""

from __future__ import annotations

from typing import Any

from propmaps_jax import stats
from propmaps_jax.analysis import propagation
from propmaps_jax.analysis.statistics import OUTCOMES, StatisticsStudy
from propmaps_jax.results import hashing


def summary(
    study: StatisticsStudy,
    model: str,
    weights: str | None,
    attack_csv: str,
    layers: str,
    device: dict[str, Any],
) -> dict[str, Any]:
    """summary.json without its wall time ("seconds"): the run's model, `weights`,
    `attack_csv` and maps' `layers` kind, the counts, the attacked pixels'
    distances from the centre and the per-layer numbers of `study`; `device`
    describes the machine."""
    order = study.order
    return {
        "model": model,
        "weights": weights,
        "attack_csv": attack_csv,
        "signed_maps": study.signed,
        "layers": layers,
        "spread_threshold": propagation.SPREAD_THRESHOLD,
        "attacks": int(study.rows["index"].size),
        "successful": study.counts["successful"],
        "failed": study.counts["failed"],
        "not_attacked": study.rows["not_attacked"],
        "pred_after_mismatches": study.mismatches,
        "distance_from_centre": {
            "metric": f"{stats.DISTANCE_METRIC} from the image centre, in pixels",
            **{
                o: stats.distance_stats(study.distances[o], study.bin_edges)
                for o in OUTCOMES
            },
            "uniform_histogram_fractions": [float(f) for f in study.uniform],
        },
        "per_layer": {
            layer: {
                outcome: {
                    s: hashing.finite_json(study.layer_stats[outcome][s][j])
                    for s in study.layer_stats[outcome]
                }
                for outcome in OUTCOMES
            }
            for j, layer in enumerate(order)
        },
        "device": device,
    }
