"""claims.md: the claims report (`statistics.claims_report`) as markdown.

The library renders its own result, so that a user who recomputes the claims of a
run reads them as the statistics experiment writes them: provenance, then per
sentence its reading, the primary statistic and verdict in one table, and the
secondary statistics below.
"""

from __future__ import annotations

import numpy as np

from propmaps_jax import stats
from propmaps_jax.analysis import propagation


def _pct(prop: dict | None) -> str:
    if prop is None:
        return "n/a"
    return stats.short_cell(prop, empty="n/a", unit="%")


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
