"""claims.json of the statistics experiment: its schema, reader and provenance dates.

Schema 2 (the claims read as the paper means them,
`propmaps_jax.analysis.claims.CLAIMS`):
{"schema": 2, "provenance", "maps", "layers", "counts", "claims": {key: entry}},
each entry a `claims.claim_record` (the paper's words, the layers, the primary
statistic and why, the secondaries, the rule; "primary", "secondary",
"verdict"). Files written before (schema 1: "close_to_max", "centre", ... at the
top level, no "claims") stay readable: `read_claims` returns them as they are,
and `claim` says in one line which experiment computes what they lack.

Provenance: a run's verdicts are prospective only if the rules' file was last
committed before the run's numbers existed. `rules_committed` asks git for the
date of the last commit that changed propmaps_jax/analysis/claims.py (any change
counts, even formatting: conservative); `numbers_first_seen` takes the earliest
date known for the run's numbers: the first commit, on any branch, holding the
exact content of its attack.csv or of an earlier claims.json (so a copy of a
committed run counts), the date an earlier claims.json recorded, their
modification times (local folders), and the time this computation started. A
copied folder (new modification times) whose files git never held can look
newer than it is: its dates are as good as the copy's.
"""

from __future__ import annotations

import datetime
import os
import subprocess
from typing import Any

from propmaps_jax.analysis import claims as claims_lib
from propmaps_jax.errors import PropmapsError
from propmaps_jax.results import _io

SCHEMA = 2
NAME = "claims.json"


def _git(folder: str, *args: str) -> str | None:
    """stdout of `git -C folder args` (stripped), None if git fails or is absent."""
    try:
        out = subprocess.run(
            ["git", "-C", folder, *args],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def rules_committed() -> tuple[str | None, bool]:
    """(ISO date of the last commit that changed claims.py or None when unknown,
    whether claims.py has uncommitted changes)."""
    path = os.path.abspath(claims_lib.__file__)
    folder, name = os.path.split(path)
    date = _git(folder, "log", "-1", "--format=%cI", "--", name)
    status = _git(folder, "status", "--porcelain", "--", name)
    return (date or None), bool(status)


def _first_commit(path: str) -> str | None:
    """ISO date of the earliest commit, on any branch of the repository that holds
    the rules, with exactly this file's content (found by its blob hash, so a
    copy of a committed file counts); None if none or no git."""
    if _io.is_url(path) or not os.path.exists(path):
        return None
    folder = os.path.dirname(os.path.abspath(claims_lib.__file__))
    blob = _git(folder, "hash-object", "--", os.path.abspath(path))
    if not blob:
        return None
    dates = _git(folder, "log", "--all", "--format=%cI", f"--find-object={blob}")
    if not dates:
        return None
    return min(dates.splitlines(), key=datetime.datetime.fromisoformat)


def _modified(path: str) -> str | None:
    if _io.is_url(path) or not os.path.exists(path):
        return None
    stamp = os.path.getmtime(path)
    return datetime.datetime.fromtimestamp(stamp, datetime.UTC).isoformat()


def numbers_first_seen(attack_csv: str, out_dir: str, started: float) -> str:
    """The earliest date known for a run's numbers (see the module docstring)."""
    dates = [datetime.datetime.fromtimestamp(started, datetime.UTC).isoformat()]
    earlier = os.path.join(out_dir, NAME)
    for path in (attack_csv, earlier):
        dates += [d for d in (_first_commit(path), _modified(path)) if d]
    if _io.exists(earlier):
        try:
            recorded = _io.read_json(earlier).get("provenance", {})
        except (ValueError, OSError, AttributeError):
            recorded = {}
        if recorded.get("numbers_first_seen"):
            dates.append(recorded["numbers_first_seen"])
    return min(dates, key=datetime.datetime.fromisoformat)


def run_provenance(attack_csv: str, out_dir: str, started: float) -> dict[str, Any]:
    """`claims.provenance` of a run from git and the run folder's dates."""
    committed, modified = rules_committed()
    return claims_lib.provenance(
        committed, numbers_first_seen(attack_csv, out_dir, started), modified
    )


def _command(out_dir: str) -> str:
    """The statistics command that writes `out_dir` (model from its summary)."""
    model = "MODEL"
    summary = os.path.join(out_dir, "summary.json")
    if _io.exists(summary):
        try:
            model = _io.read_json(summary).get("model") or model
        except (ValueError, OSError, AttributeError):
            pass
    workdir = os.path.dirname(os.path.normpath(out_dir))
    return (
        f"python launch.py --experiment=statistics --model={model} --workdir={workdir}"
    )


def read_claims(out_dir: str) -> dict[str, Any]:
    """claims.json of a statistics folder, any schema (1: without "claims")."""
    path = os.path.join(out_dir, NAME)
    if not _io.exists(path):
        raise PropmapsError(
            f"{out_dir} has no {NAME}: run `{_command(out_dir)}` to compute the claims"
        )
    try:
        report = _io.read_json(path)
    except ValueError as error:
        raise PropmapsError(
            f"{path} is not JSON ({error}): run `{_command(out_dir)}` again"
        ) from None
    if not isinstance(report, dict):
        raise PropmapsError(f"{path} is not a claims report: run `{_command(out_dir)}`")
    report.setdefault("schema", 1)
    return report


def claim(out_dir: str, key: str) -> dict[str, Any]:
    """One claim's entry (schema 2) of a statistics folder; one line naming the
    experiment to run when the folder lacks it or the maps it needs."""
    if key not in claims_lib.CLAIM:
        raise PropmapsError(
            f"no claim {key!r}; the claims: {', '.join(claims_lib.CLAIM)}"
        )
    report = read_claims(out_dir)
    entry = report.get("claims", {}).get(key)
    if entry is None:
        raise PropmapsError(
            f"{out_dir}/{NAME} (schema {report['schema']}) predates the claims read "
            f"as the paper means them: run `{_command(out_dir)}` to compute {key}"
        )
    if entry.get("not_computed"):
        raise PropmapsError(
            f"{out_dir}: {key} was not computed ({entry['not_computed']}): run "
            f"`{_command(out_dir)}` on a run that has the maps it needs"
        )
    return entry
