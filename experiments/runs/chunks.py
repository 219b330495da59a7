"""The chunk store of an attack run directory: where finished pieces are kept.

DIR/.attack_chunks/chunk_<start>_<end>.json, one per finished piece of the run,
each written whole (`storage`: a renamed temporary file, or one upload on gs://),
holding the rows of sampled images start..end-1 (the chunk format and its checks
are the library's: `propmaps_jax.results.attack_csv`); DIR/.attack_chunks/
settings.json records the settings. A resume walks the chunks from the first
image (`finished_prefix`); one that fails its checks is moved to
.attack_chunks/damaged/ and its images are attacked again, one of other settings
to .attack_chunks/stale/ (`sort_out_chunks`).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Collection

import numpy as np

from experiments.runs import integrity, rundir, storage
from propmaps_jax.results import attack_csv
from propmaps_jax.results.attack_csv import CONTENT_KEY, UNKNOWN, chunk_sha256

CHUNKS_DIR = ".attack_chunks"
DAMAGED_DIR = "damaged"
STALE_DIR = "stale"


def chunk_path(chunks_dir: str, start: int, end: int) -> str:
    """The file of the chunk of sampled images start..end-1."""
    return os.path.join(chunks_dir, f"chunk_{start:07d}_{end:07d}.json")


def chunk_files(chunks_dir: str) -> dict[int, list[tuple[int, str]]]:
    """{start: [(end, path), ...]} of the chunk files in `chunks_dir`."""
    found: dict[int, list[tuple[int, str]]] = {}
    for path in storage.glob(os.path.join(chunks_dir, "chunk_*_*.json")):
        match = re.fullmatch(r"chunk_(\d+)_(\d+)\.json", os.path.basename(path))
        if match:
            start, end = int(match.group(1)), int(match.group(2))
            found.setdefault(start, []).append((end, path))
    return found


def finished_prefix(
    chunks_dir: str,
    indices: np.ndarray,
    settings_hashes: Collection[str],
    legacy_ok: bool,
    recorded: dict[str, str] | None = None,
    target: int | None | str = UNKNOWN,
    image_shape: tuple[int, int] | None = None,
) -> tuple[int, list[dict], dict[str, list[str]]]:
    """End of the contiguous run of finished chunks from 0, those chunks, and the
    paths of the chunk files passed over by kind ("legacy": taken without a hash;
    "damaged": failed their checks; "other", "unproven": never merged; see
    `attack_csv.read_chunk`). `recorded`: the summary's `chunks_sha256` ({file
    name: SHA-256}), `target`, `image_shape`: the run's, for the row rules.

    The walk goes from each chunk's end to the chunk that starts there, so no image
    is ever taken twice; a chunk must hold exactly the rows of the sampled images
    of its range (`indices[start:end]`, in order), pass its checks and carry one of
    this run's settings hashes, else the prefix ends before it and its images are
    attacked again. Chunks past the last sampled image (a run that counted more
    images) are left where they are. Of several chunks starting at the same image
    (resumes with another chunking), the longest valid one is taken.
    """
    found = chunk_files(chunks_dir)
    recorded = recorded or {}
    end, chunks, walked = 0, [], set()
    kinds: dict[str, list[str]] = {
        "legacy": [],
        "damaged": [],
        "other": [],
        "unproven": [],
    }
    while end in found:
        for next_end, path in sorted(found[end], reverse=True):
            if next_end <= end or next_end > len(indices):
                continue
            walked.add(path)
            chunk, kind = _read_chunk(
                path,
                indices[end:next_end],
                settings_hashes,
                legacy_ok,
                recorded.get(os.path.basename(path)),
                target,
                image_shape,
            )
            if kind in kinds:
                kinds[kind].append(path)
            if chunk is not None:
                chunks.append({**chunk, "_path": path})
                end = next_end
                break
        else:
            break
    # Chunks of other settings anywhere in the folder, not only on the walk (whose
    # chunks were read and sorted there).
    for entries in found.values():
        for _, path in entries:
            if path in walked:
                continue
            try:
                recorded_hash = rundir.read_json(path).get("settings_sha256")
            except storage.StorageError:
                raise
            except (OSError, ValueError, AttributeError):
                continue
            if recorded_hash is None and not legacy_ok:
                kinds["unproven"].append(path)
            elif recorded_hash is not None and recorded_hash not in settings_hashes:
                kinds["other"].append(path)
    return end, chunks, kinds


def _read_chunk(path: str, *args) -> tuple[dict | None, str]:
    """`attack_csv.read_chunk` of the file at `path`, with the SHA-256 of its bytes
    (chunk["_sha256"]); (None, "damaged") when it cannot be read (a store that
    cannot be reached stays one StorageError)."""
    try:
        data = storage.read_bytes(path)
    except storage.StorageError:
        raise  # the store is unreachable: one line, never "a bad chunk"
    except OSError:
        return None, "damaged"
    chunk, kind = attack_csv.read_chunk(path, data, *args)
    if chunk is not None:
        chunk["_sha256"] = hashlib.sha256(data).hexdigest()
    return chunk, kind


def save_chunk(chunks_dir: str, start: int, end: int, chunk: dict) -> None:
    """Atomically write one finished chunk of rows, with the hash of its content."""
    _write_chunk(chunk_path(chunks_dir, start, end), chunk)


def _write_chunk(path: str, chunk: dict) -> None:
    """Write `chunk` (its content, then its content hash) at `path`; the SHA-256
    of the bytes written goes to chunk["_sha256"] (what the summary records)."""
    content = {
        k: v for k, v in chunk.items() if k != CONTENT_KEY and not k.startswith("_")
    }
    data = rundir.json_bytes({**content, CONTENT_KEY: chunk_sha256(content)})
    rundir.write_bytes(path, data)
    chunk["_sha256"] = hashlib.sha256(data).hexdigest()


def _move_aside(path: str, folder: str) -> None:
    """Move a chunk file into `folder` (renamed, never deleted; a name already
    there gets a numbered suffix)."""
    name = os.path.basename(path)
    target, n = os.path.join(folder, name), 1
    while storage.exists(target):
        target, n = os.path.join(folder, f"{name}.{n}"), n + 1
    storage.move(path, target)


def sort_out_chunks(
    chunks_dir: str, kinds: dict[str, list[str]], shash: str, taken: list[dict]
) -> None:
    """Legacy chunks taken (among `taken`, `finished_prefix`'s chunks): their
    settings hash and content hash are written now (accepted once, recorded for
    good). Damaged chunks: moved to .attack_chunks/damaged/, their images
    attacked again. Chunks of other or unproven settings: moved to
    .attack_chunks/stale/, never merged. One line each."""
    if kinds["legacy"]:
        unhashed, by_path = 0, {chunk["_path"]: chunk for chunk in taken}
        for path in kinds["legacy"]:
            chunk = by_path[path]
            unhashed += "settings_sha256" not in chunk
            chunk["settings_sha256"] = chunk.get("settings_sha256") or shash
            _write_chunk(path, chunk)
        what = (
            "their settings are taken (their settings.json matches these settings"
            if unhashed
            else "their own hash are taken (their settings hash is this run's"
        )
        integrity.note(
            f"{chunks_dir}: {len(kinds['legacy'])} chunks written before chunks "
            f"recorded {what}, their rows pass the checks); their hashes are now "
            "recorded"
        )
    damaged = sorted(set(kinds["damaged"]))
    if damaged:
        folder = os.path.join(chunks_dir, DAMAGED_DIR)
        for path in damaged:
            _move_aside(path, folder)
        names = ", ".join(os.path.basename(p) for p in damaged)
        integrity.note(
            f"{chunks_dir}: {len(damaged)} chunks fail their checks (edited, "
            f"truncated or contradicting themselves: {names}); moved to {folder}, "
            "their images are attacked again"
        )
    aside = sorted(set(kinds["other"]) | set(kinds["unproven"]))
    if aside:
        stale = os.path.join(chunks_dir, STALE_DIR)
        for path in aside:
            _move_aside(path, stale)
        integrity.note(
            f"{chunks_dir}: {len(aside)} chunks made under other settings (or with "
            f"no record of them) are not merged; moved to {stale}"
        )


def images_done(workdir: str, num_samples: int) -> int:
    """Sampled images already done in a run directory (a quick look for the job's
    cost estimate: the finished attack.csv, else the contiguous chunk files)."""
    found, end = chunk_files(os.path.join(workdir, CHUNKS_DIR)), 0
    while end in found:
        following = max(e for e, _ in found[end])
        if following <= end:
            break
        end = following
    summary_path = os.path.join(workdir, attack_csv.SUMMARY_NAME)
    csv_path = os.path.join(workdir, attack_csv.CSV_NAME)
    if storage.isfile(summary_path) and storage.isfile(csv_path):
        # A finished run, perhaps of fewer samples (a run's count may grow).
        summary = integrity.read_json_record(summary_path)
        finished = summary.get("num_samples") if isinstance(summary, dict) else None
        end = max(end, finished if isinstance(finished, int) else num_samples)
    return min(end, num_samples)
