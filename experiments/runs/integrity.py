"""What made each file of a run, and the one check every reader applies.

Every result records the hashes of what it was made from:
- each attack chunk, the SHA-256 of its run's settings (`settings_sha256`), so a
  chunk made under other settings is never merged;
- attack_summary.json, the SHA-256 of attack.csv and of each chunk it was built
  from (`attack_csv_sha256`, `chunks_sha256`);
- a locality record, the SHA-256 of its attack.csv (in its settings) and of the
  files it wrote (`files_sha256`).

A rerun recomputes what is missing, truncated, edited or stale and says so in
one line (`note`); a consumer (statistics, salience, propagation, locality)
refuses an attack.csv that is not the one its summary records, through
`check_attack_csv`. Files written before these records existed carry no hash:
they are checked by their content as before (an attack.csv by its rows and the
counts of its summary), and get the record the next time their run writes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile

import numpy as np

from experiments.report.progress import say
from experiments.runs import rundir, storage
from propmaps_jax.errors import PropmapsError


def settings_sha256(settings: dict) -> str:
    """SHA-256 of a settings record (canonical JSON: sorted keys, no spaces)."""
    text = json.dumps(
        rundir.finite_json(settings), sort_keys=True, separators=(",", ":")
    )
    return hashlib.sha256(text.encode()).hexdigest()


def text_sha256(text: str) -> str:
    """SHA-256 of a text file's UTF-8 bytes (as `rundir.file_sha256` of the file)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def note(message: str) -> None:
    """One line on stderr: what a rerun recomputes and why."""
    say(message)


def attack_csv_problem(csv_path: str, summary: dict | None) -> str:
    """'' when attack.csv is the file its summary records (by SHA-256), else why not.

    A summary without the record (runs made before it existed) is not compared
    here; the rows are still checked by `results.read_attack_csv`.
    """
    recorded = (summary or {}).get("attack_csv_sha256")
    if not storage.isfile(csv_path):
        return f"{csv_path} is missing"
    if not isinstance(recorded, str):
        return ""
    found = rundir.file_sha256(csv_path)
    if found != recorded:
        return (
            f"{csv_path} is not the file its attack run wrote (SHA-256 {found[:12]}, "
            f"recorded {recorded[:12]}: edited or truncated since)"
        )
    return ""


def check_attack_csv(csv_path: str, summary: dict | None) -> None:
    """PropmapsError (one line, how to rebuild) unless attack.csv is as recorded."""
    problem = attack_csv_problem(csv_path, summary)
    if problem:
        raise PropmapsError(
            f"{problem}; run the same attack command again: it rebuilds the file "
            "from its chunks (or attacks again)"
        )


def read_json_record(path: str) -> dict | None:
    """A JSON object file, or None when missing, empty, truncated or not an object."""
    try:
        record = rundir.read_json(path)
    except storage.StorageError:
        raise  # the store is unreachable: one line, not "unreadable"
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) else None


def read_npz(path: str) -> dict[str, np.ndarray] | None:
    """Every array of an .npz, or None when missing, truncated or unreadable."""
    try:
        with np.load(io.BytesIO(storage.read_bytes(path))) as npz:
            return {k: npz[k] for k in npz.files}
    except storage.StorageError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError):
        return None


def files_sha256(folder: str, names: list[str]) -> dict[str, str]:
    """{name: SHA-256} of the files of `folder` that exist."""
    return {
        name: rundir.file_sha256(os.path.join(folder, name))
        for name in names
        if storage.isfile(os.path.join(folder, name))
    }


def reusable(path: str, settings: dict, required: list[str]) -> tuple[dict | None, str]:
    """(record, '') when the record at `path` and its files can be reused, else
    (None, why not) ('' when there is simply no record yet).

    Reused only when the record is a readable JSON object made with `settings`,
    and every file in `required` (names beside it) exists and, when the record
    lists its hash (`files_sha256`), still has it.
    """
    if not storage.exists(path):
        return None, ""
    record = read_json_record(path)
    name = os.path.basename(path)
    if record is None:
        return None, f"{name} is empty or unreadable"
    stored = record.get("settings")
    if stored != settings:
        if isinstance(stored, dict):
            return (
                None,
                f"its settings changed ({rundir.differences(stored, settings)})",
            )
        return None, f"{name} records no settings"
    folder = os.path.dirname(path)
    hashes = record.get("files_sha256") or {}
    for file in required:
        file_path = os.path.join(folder, file)
        if not storage.isfile(file_path):
            return None, f"{file} is missing"
        if file in hashes and rundir.file_sha256(file_path) != hashes[file]:
            return None, f"{file} was changed or truncated since it was written"
    return record, ""
