"""Reusing a run's files: records of what made them, checked before reuse.

Every result records the hashes of what it was made from:
- each attack chunk, the SHA-256 of its run's settings (`settings_sha256`), so a
  chunk made under other settings is never merged;
- attack_summary.json, the SHA-256 of attack.csv and of each chunk it was built
  from (`attack_csv_sha256`, `chunks_sha256`);
- a locality record, the SHA-256 of its attack.csv (in its settings) and of the
  files it wrote (`files_sha256`).

The hashes themselves, and the check that an attack.csv is the one its summary
records (`read_recorded_csv`, applied by every consumer: statistics, salience,
propagation, locality), are the results formats' (`propmaps_jax.results`). A
rerun recomputes what is missing, truncated, edited or stale and says so in one
line (`note`). Files written before these records existed carry no hash:
they are checked by their content as before (an attack.csv by its rows and the
counts of its summary), and get the record the next time their run writes.
"""

from __future__ import annotations

import io
import os
import zipfile

import numpy as np

from experiments.report.progress import say
from experiments.runs import rundir, storage


def note(message: str) -> None:
    """One line on stderr: what a rerun recomputes and why."""
    say(message)


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
