"""An attack run: its results file `attack.csv`, read back as arrays and checked.

One row per sampled image, in sampling order:
`index, label, pred_before, prob_true_before, attacked, success, pred_after,
prob_true_after, generations, evaluations`, then per pixel i (1-based)
`row_i, col_i, r_i, g_i, b_i`. For images that were not attacked (misclassified
before the attack, or of the target class) attacked = success = 0, the "after"
columns repeat the "before" ones and the pixel columns are -1. A failed attack
still reports its best candidate in the pixel columns.

A user reads any attack.csv with the package alone: `read_attack_results(path)`
gives an `AttackResults` of NumPy arrays (pixels (N, k, 5)). Every experiment
that reads an attack run goes through `load_attack_run` (or, for the file alone,
`read_attack_csv`), so that all of them refuse the same things:
a run made with another model, other weights or other data than the ones they are
given (checked against the provenance recorded in attack_summary.json), a row
that repeats a test image, and a row that contradicts itself (a success whose
class did not change, a pixel outside the image, ...). Each refusal is one line
naming the file and the row.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import os
from collections.abc import Collection
from typing import Any

import numpy as np

from propmaps_jax.errors import PropmapsError, RefusedFile
from propmaps_jax.models import checkpoint
from propmaps_jax.results import _io, hashing, provenance

CSV_NAME = "attack.csv"
SUMMARY_NAME = "attack_summary.json"
BASE_COLUMNS = (
    "index",
    "label",
    "pred_before",
    "prob_true_before",
    "attacked",
    "success",
    "pred_after",
    "prob_true_after",
    "generations",
    "evaluations",
)
FLOAT_COLUMNS = ("prob_true_before", "prob_true_after")
PIXEL_FIELDS = ("row", "col", "r", "g", "b")
# An attack run checked by predictions (no recorded weights hash to compare):
# refused when more of its stored predictions than this differ from the given
# model's (a few may flip on another device or batch size).
MAX_PREDICTION_MISMATCH = 0.05
# The target of the run is not known (no attack_summary.json next to the file).
UNKNOWN = "unknown"
_RERUN = "run the attack again (into an empty --workdir)"
_REBUILD = (
    "run the same attack command again: it rebuilds the file from its chunks (or "
    "attacks again)"
)


def attack_columns(pixels: int) -> list[str]:
    """All column names for an attack of `pixels` pixels."""
    return list(BASE_COLUMNS) + [
        f"{field}_{i}" for i in range(1, pixels + 1) for field in PIXEL_FIELDS
    ]


def num_pixels(columns: list[str]) -> int:
    """Number of attacked pixels k from the header."""
    return sum(1 for c in columns if c.startswith("row_"))


def read_summary(directory: str) -> dict[str, Any] | None:
    """DIR/attack_summary.json, or None when the run has none."""
    path = os.path.join(directory, SUMMARY_NAME)
    if not _io.isfile(path):
        return None
    try:
        summary = json.loads(_io.read_bytes(path))
    except (ValueError, UnicodeDecodeError):
        summary = None
    if not isinstance(summary, dict) or not isinstance(
        summary.get("settings", {}), dict
    ):
        raise RefusedFile(f"{path} is not an attack summary (JSON object)", _RERUN)
    return summary


def _summary_target(summary: dict | None) -> int | None | str:
    """The run's target class (None: untargeted), UNKNOWN without a record."""
    if summary is None or "target" not in summary.get("settings", {}):
        return UNKNOWN
    return summary["settings"]["target"]


def _parse(path: str, text: str) -> tuple[list[str], np.ndarray]:
    """(header, table (N, columns) float64) of attack.csv's `text` (`path` names it
    in messages); the first malformed line named."""
    with io.StringIO(text, newline="") as f:
        reader = csv.reader(f)
        try:
            header = next(reader)
        except StopIteration:
            raise RefusedFile(f"{path} is empty", _RERUN) from None
        rows = list(reader)
    k = num_pixels(header)
    expected = attack_columns(max(k, 1))
    if header != expected:
        missing = [c for c in expected if c not in header]
        extra = [c for c in header if c not in expected]
        detail = "; ".join(
            part
            for part in (
                f"missing {', '.join(missing)}" if missing else "",
                f"unexpected {', '.join(extra)}" if extra else "",
                "" if missing or extra else "columns out of order",
            )
            if part
        )
        raise RefusedFile(
            f"{path} does not have the columns of an attack.csv ({detail})", _RERUN
        )
    for line, row in enumerate(rows, start=2):
        if len(row) != len(header):
            raise RefusedFile(
                f"{path} line {line} has {len(row)} fields, the header {len(header)}",
                _RERUN,
            )
    try:
        table = np.array(rows, dtype=np.float64).reshape(len(rows), len(header))
    except ValueError:
        for line, row in enumerate(rows, start=2):
            for name, value in zip(header, row, strict=True):
                try:
                    float(value)
                except ValueError:
                    raise RefusedFile(
                        f"{path} line {line}: {name} is {value!r}, not a number",
                        _RERUN,
                    ) from None
        raise
    return header, table


def _row_problems(
    table: dict[str, np.ndarray],
    target: int | None | str,
    image_shape: tuple[int, int] | None,
) -> list[tuple[np.ndarray, Any]]:
    """(mask (N,) of offending rows, message of row j) for every rule, in order."""
    label = table["label"]
    before, after = table["pred_before"], table["pred_after"]
    attacked, success = table["attacked"] == 1, table["success"] == 1
    pixels = table["pixels"]
    correct = before == label
    rules: list[tuple[np.ndarray, Any]] = []
    for name in ("attacked", "success"):
        rules.append(
            (
                ~np.isin(table[name], (0, 1)),
                lambda j, name=name: f"{name} is {table[name][j]}, not 0 or 1",
            )
        )
    for name in ("index", "label", "pred_before", "pred_after"):
        rules.append(
            (table[name] < 0, lambda j, name=name: f"{name} is {table[name][j]} < 0")
        )
    for name in FLOAT_COLUMNS:
        rules.append(
            (
                ~((table[name] >= 0) & (table[name] <= 1)),
                lambda j, name=name: f"{name} is {table[name][j]}, not in 0..1",
            )
        )
    for name in ("generations", "evaluations"):
        rules.append(
            (table[name] < 0, lambda j, name=name: f"{name} is {table[name][j]} < 0")
        )
    rules += [
        (success & ~attacked, lambda j: "success=1 but attacked=0"),
        (
            ~attacked & np.any(pixels != -1, axis=(1, 2)),
            lambda j: "not attacked but its pixel columns are not -1",
        ),
        (
            ~attacked & (after != before),
            lambda j: (
                f"not attacked but pred_after {after[j]} != pred_before {before[j]}"
            ),
        ),
        (
            attacked & ~correct,
            lambda j: (
                f"attacked although pred_before {before[j]} != label "
                f"{label[j]} (only correctly classified images are attacked)"
            ),
        ),
    ]
    if target is None:
        rules += [
            (
                ~attacked & correct,
                lambda j: (
                    f"not attacked although correctly classified "
                    f"(pred_before = label = {label[j]})"
                ),
            ),
            (
                attacked & success & (after == label),
                lambda j: (
                    f"success=1 but pred_after = label = {label[j]} (an "
                    "untargeted attack succeeds when the class changes)"
                ),
            ),
            (
                attacked & ~success & (after != label),
                lambda j: (
                    f"success=0 but pred_after {after[j]} != label {label[j]} "
                    "(the class changed)"
                ),
            ),
        ]
    elif target != UNKNOWN:
        rules += [
            (
                attacked & (label == target),
                lambda j: f"attacked although its label is the target class {target}",
            ),
            (
                ~attacked & correct & (label != target),
                lambda j: (
                    f"not attacked although correctly classified "
                    f"(pred_before = label = {label[j]})"
                ),
            ),
            (
                attacked & (success != (after == target)),
                lambda j: (
                    f"success={int(success[j])} but pred_after is {after[j]} "
                    f"(a targeted attack succeeds when the class becomes {target})"
                ),
            ),
        ]
    else:  # untargeted or targeted: either way a success changes the class
        rules.append(
            (
                attacked & success & (after == label),
                lambda j: f"success=1 but pred_after = label = {label[j]}",
            )
        )
    rows, cols = pixels[..., 0], pixels[..., 1]
    outside = (rows < 0) | (cols < 0)
    size = " the image"
    if image_shape is not None:
        height, width = image_shape
        outside |= (rows >= height) | (cols >= width)
        size = f" the {height}x{width} image"

    def where(j: int) -> str:
        p = int(np.flatnonzero(outside[j])[0])
        return f"pixel {p + 1} at ({rows[j, p]}, {cols[j, p]}) lies outside{size}"

    rules += [
        (attacked & np.any(outside, axis=1), where),
        (
            attacked & np.any((pixels[..., 2:] < 0) | (pixels[..., 2:] > 255), (1, 2)),
            lambda j: "a pixel colour lies outside 0..255",
        ),
    ]
    return rules


def _check_duplicates(path: str, index: np.ndarray) -> None:
    """PropmapsError naming the first row that repeats an earlier test image."""
    _, first = np.unique(index, return_index=True)
    if first.size == index.size:
        return
    repeated = sorted(set(range(index.size)) - set(first.tolist()))[0]
    earlier = int(np.flatnonzero(index == index[repeated])[0])
    raise RefusedFile(
        f"{path} line {repeated + 2}: test image {index[repeated]} appears again "
        f"(first on line {earlier + 2}); an attack.csv holds one row per image (is it "
        "two runs put together?)",
        _RERUN,
    )


def _check_summary_counts(path: str, table: dict, summary: dict | None) -> None:
    """PropmapsError when the summary's counts are not those of the file."""
    if summary is None:
        return
    found = {
        "num_samples": int(table["index"].size),
        "attacked": int(table["attacked"].sum()),
        "successes": int(table["success"].sum()),
    }
    recorded = {k: summary[k] for k in found if isinstance(summary.get(k), int)}
    differ = [k for k in recorded if recorded[k] != found[k]]
    if differ:
        said = ", ".join(f"{k} {recorded[k]}" for k in differ)
        holds = ", ".join(f"{k} {found[k]}" for k in differ)
        raise RefusedFile(
            f"{path} holds {holds} but its {SUMMARY_NAME} says {said}: the two files "
            "are not of the same run",
            _RERUN,
            "; ",
        )


def read_attack_csv(
    path: str,
    image_shape: tuple[int, int] | None = None,
    summary: dict | None | str = UNKNOWN,
) -> dict[str, np.ndarray]:
    """attack.csv as arrays, plus "pixels": int (N, k, 5) (row, col, r, g, b).

    Every row is checked (one row per test image, values in range, consistent with
    the run's target; pixels inside `image_shape` (height, width) when given) and
    the counts against `summary` (default: the attack_summary.json beside the
    file, when there is one). A PropmapsError names the first offending line.
    """
    if isinstance(summary, str):
        summary = read_summary(os.path.dirname(path))
    if not _io.isfile(path):
        raise PropmapsError(_missing(path))
    text = _io.read_text(path)
    return read_attack_text(path, text, _summary_target(summary), image_shape, summary)


def _missing(path: str) -> str:
    return (
        f"{path} does not exist: run the attack first "
        "(python launch.py --experiment=attack --workdir=...)"
    )


def read_recorded_csv(
    path: str, summary: dict | None, image_shape: tuple[int, int] | None = None
) -> tuple[dict[str, np.ndarray], str]:
    """attack.csv read once, as its `summary` records it: (its rows as
    `read_attack_csv` gives them, the SHA-256 of the bytes they were read from).

    Refused with one line (PropmapsError): a missing file, a file that is not the
    one the summary records (`attack_csv_sha256`: edited or truncated since; a
    summary made before the record existed is not compared), a row that breaks a
    rule of `read_attack_text` or the summary's counts.
    """
    if not _io.isfile(path):
        if summary is None:
            raise PropmapsError(_missing(path))
        raise RefusedFile(f"{path} is missing", _REBUILD, "; ")
    data = _io.read_bytes(path)
    found = hashlib.sha256(data).hexdigest()
    recorded = (summary or {}).get("attack_csv_sha256")
    if isinstance(recorded, str) and found != recorded:
        raise RefusedFile(
            f"{path} is not the file its attack run wrote (SHA-256 {found[:12]}, "
            f"recorded {recorded[:12]}: edited or truncated since)",
            _REBUILD,
            "; ",
        )
    table = read_attack_text(
        path, data.decode("utf-8"), _summary_target(summary), image_shape, summary
    )
    return table, found


def read_attack_text(
    path: str,
    text: str,
    target: int | None | str = UNKNOWN,
    image_shape: tuple[int, int] | None = None,
    summary: dict | None = None,
) -> dict[str, np.ndarray]:
    """The rows of attack.csv's `text` as arrays, every row checked: the one set of
    row rules of the project, applied by the attack to the rows it writes (and to
    each chunk it reads back) and by every reader of attack.csv.

    Rules: one row per test image; every value a finite number, integers where
    the column is one; flags 0 or 1; probabilities in 0..1; counts >= 0; a
    success only of an attacked image and one that changes the class (into
    `target` when targeted; None: untargeted; UNKNOWN: either); pixels inside
    `image_shape` (height, width) when given, colours in 0..255; then the counts
    of `summary` (num_samples, attacked, successes) when given. A PropmapsError
    names `path` and the first offending line.
    """
    header, table = _parse(path, text)
    k = num_pixels(header)
    integral = [j for j, c in enumerate(header) if c not in FLOAT_COLUMNS]
    bad = ~np.isfinite(table) | (
        np.isin(np.arange(len(header)), integral) & (table != np.round(table))
    )
    if np.any(bad):
        row, col = (int(v) for v in np.argwhere(bad)[0])
        raise RefusedFile(
            f"{path} line {row + 2}: {header[col]} is {table[row, col]:g}, not "
            f"{'a finite number' if header[col] in FLOAT_COLUMNS else 'an integer'}",
            _RERUN,
        )
    out: dict[str, np.ndarray] = {}
    for j, name in enumerate(header):
        column = table[:, j]
        out[name] = column if name in FLOAT_COLUMNS else column.astype(np.int64)
    pixel_cols = [header.index(f"row_{i}") for i in range(1, k + 1)]
    out["pixels"] = np.stack([table[:, c : c + 5] for c in pixel_cols], axis=1).astype(
        np.int64
    )
    _check_duplicates(path, out["index"])
    for mask, problem in _row_problems(out, target, image_shape):
        if np.any(mask):
            j = int(np.flatnonzero(mask)[0])
            raise RefusedFile(
                f"{path} line {j + 2} (test image {out['index'][j]}): {problem(j)}",
                _RERUN,
            )
    out["attacked"] = out["attacked"].astype(bool)
    out["success"] = out["success"].astype(bool)
    _check_summary_counts(path, out, summary)
    return out


@dataclasses.dataclass(frozen=True)
class AttackResults:
    """The rows of an attack.csv as arrays, one entry per sampled image (N,).

    `pixels` is (N, k, 5): row, col, r, g, b of each attacked pixel (-1 for an
    image that was not attacked); `summary`: its attack_summary.json, or None.
    """

    index: np.ndarray
    label: np.ndarray
    pred_before: np.ndarray
    prob_true_before: np.ndarray
    attacked: np.ndarray
    success: np.ndarray
    pred_after: np.ndarray
    prob_true_after: np.ndarray
    generations: np.ndarray
    evaluations: np.ndarray
    pixels: np.ndarray
    summary: dict[str, Any] | None = None

    def __len__(self) -> int:
        return int(self.index.size)


def read_attack_results(
    path: str, image_shape: tuple[int, int] | None = None
) -> AttackResults:
    """An attack.csv (local or gs://) as `AttackResults`, every row checked.

    Args:
      path: the attack.csv file, or the run directory holding it.
      image_shape: (height, width) of the images, to check the pixels against.

    Refused with one line (PropmapsError): a file that is not the one its
    attack_summary.json records, or a row that breaks a rule of
    `read_attack_text` (`read_recorded_csv`: the file is read once).
    """
    if not path.endswith(".csv"):
        path = os.path.join(path, CSV_NAME)
    summary = read_summary(os.path.dirname(path))
    table, _ = read_recorded_csv(path, summary, image_shape)
    names = [f.name for f in dataclasses.fields(AttackResults) if f.name != "summary"]
    return AttackResults(**{name: table[name] for name in names}, summary=summary)


def check_dataset(
    path: str, table: dict[str, np.ndarray], images: np.ndarray, labels: np.ndarray
) -> None:
    """PropmapsError unless every row's test image exists and has the row's label."""
    index = table["index"]
    outside = np.flatnonzero(index >= len(images))
    if outside.size:
        j = int(outside[0])
        raise PropmapsError(
            f"{path} line {j + 2} refers to test image {index[j]} but the test set has "
            f"{len(images)} images: pass the --cifar10_path the attack ran on"
        )
    differ = np.flatnonzero(np.asarray(labels)[index] != table["label"])
    if differ.size:
        j = int(differ[0])
        raise PropmapsError(
            f"{path} line {j + 2}: test image {index[j]} has label {table['label'][j]} "
            f"there but {int(labels[index[j]])} in this data set: pass the "
            "--cifar10_path the attack ran on"
        )


def given_provenance(
    model_name: str, weights: str | None, images: np.ndarray, labels: np.ndarray
) -> dict[str, str]:
    """provenance.describe of what a consumer was given; without the weights hash
    when the weights file is missing (loading the model then says so)."""
    expected = {
        "model": model_name,
        "dataset_sha256": provenance.dataset_sha256(images, labels),
    }
    path = (
        checkpoint.bundled_checkpoint_path(model_name) if weights is None else weights
    )
    if os.path.isfile(path):
        expected["weights_sha256"] = provenance.weights_sha256(model_name, weights)
    return expected


def recorded_weights(summary: dict) -> str | None:
    """The weights file an attack run was made with (None: the bundled checkpoint),
    as its summary records it (summary["model"]["weights"]; older runs also in
    their settings)."""
    model = summary.get("model")
    recorded = model.get("weights") if isinstance(model, dict) else None
    if recorded is None:
        recorded = summary.get("settings", {}).get("weights")
    return None if recorded in (None, "bundled checkpoint") else str(recorded)


def _remedy(summary: dict, expected: dict[str, str]) -> str:
    """'pass --model=... --weights=..., as the attack did, or ...' for a mismatch."""
    settings = summary.get("settings", {})
    differ = [
        k
        for k in provenance.KEYS
        if settings.get(k) is not None
        and expected.get(k) is not None
        and settings[k] != expected[k]
    ]
    flags = []
    if "model" in differ:
        flags.append(f"--model={settings['model']}")
    if "model" in differ or "weights_sha256" in differ:
        weights = recorded_weights(summary)
        flags.append(
            f"--weights={weights}"
            if weights
            else "no --weights (it used the bundled checkpoint)"
        )
    if "dataset_sha256" in differ:
        source = summary.get("dataset")
        train_split = " [train split]"
        if source and source.endswith(train_split):
            source = source[: -len(train_split)] + " --data_split=train"
        flags.append(
            f"--cifar10_path={source}" if source else "the --cifar10_path it used"
        )
    return (
        f"pass {' and '.join(flags)}, as the attack did, or the --workdir of another "
        "attack run"
    )


@dataclasses.dataclass(frozen=True)
class AttackRun:
    """A checked attack run: its attack.csv as arrays, its summary (or None) and
    the SHA-256 of the attack.csv bytes the arrays were read from (or written as).

    A --target=all run has no attack.csv of its own (one run per class in
    DIR/target_<c>/): its table and csv_sha256 are None.
    """

    directory: str
    csv_path: str
    table: dict[str, np.ndarray] | None
    summary: dict[str, Any] | None
    csv_sha256: str | None

    @property
    def weights_verified(self) -> bool:
        """Whether the weights were compared by content with the run's record."""
        settings = (self.summary or {}).get("settings", {})
        return settings.get("weights_sha256") is not None


def load_attack_run(
    directory: str,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    model_name: str,
    weights: str | None,
) -> AttackRun:
    """DIR/attack.csv checked against the model, weights and test split it is to be
    used with (images/labels: the whole test split the samples were drawn from).

    Refused with one line: an attack.csv that is not the file its summary records
    (by SHA-256: edited or truncated since; `read_recorded_csv`); a run whose
    attack_summary.json records another model,
    other weights or other data (by content); a row that repeats an image, that
    contradicts itself or the summary, or whose image or label is not in the data.
    """
    csv_path = os.path.join(directory, CSV_NAME)
    summary = read_summary(directory)
    if summary is not None and summary.get("settings", {}).get("target") == "all":
        raise PropmapsError(
            f"{directory} holds a --target=all attack (one run per class): pass "
            f"--workdir={os.path.join(directory, 'target_<class>')}"
        )
    if not _io.isfile(csv_path):
        raise PropmapsError(_missing(csv_path))
    if summary is not None:
        expected = given_provenance(model_name, weights, images, labels)
        provenance.require_match(
            f"the attack run in {directory}",
            summary.get("settings", {}),
            expected,
            _remedy(summary, expected),
        )
    table, sha256 = read_recorded_csv(csv_path, summary, tuple(images.shape[1:3]))
    check_dataset(csv_path, table, images, labels)
    return AttackRun(directory, csv_path, table, summary, sha256)


def require_predictions_match(csv_path: str, mismatches: int, total: int) -> None:
    """PropmapsError when too many stored predictions differ from the model's."""
    if mismatches > MAX_PREDICTION_MISMATCH * total:
        raise PropmapsError(
            f"{csv_path} was not made by this model: {mismatches} of {total} attacked "
            "images are predicted differently than it records; pass the --model and "
            "--weights of the attack run"
        )


# ---------------------------------------------------------------------------------
# Rows: one line of attack.csv. Chunks carry their rows as these lines, so that
# attack.csv is the chunks' rows joined, byte for byte; they are written by
# `format_row` and read back by `row_index` / `row_values` only.


def format_row(values: list[Any]) -> str:
    """One attack.csv line of `values` (floats with 9 significant digits)."""
    return ",".join(f"{v:.9g}" if isinstance(v, float) else str(v) for v in values)


def row_index(row: str) -> int:
    """The dataset index of a row (its first column)."""
    return int(row.split(",", 1)[0])


def row_values(row: str) -> dict[str, str]:
    """The base columns of a row by name, as written (text)."""
    return dict(zip(BASE_COLUMNS, row.split(","), strict=False))


def csv_text(pixels: int, rows: list[str]) -> str:
    """attack.csv's text: the header of a `pixels`-pixel attack, then the rows."""
    return "\n".join([",".join(attack_columns(pixels))] + rows) + "\n"


# ---------------------------------------------------------------------------------
# A chunk: one finished piece of an attack run, the JSON object
# {"rows": [attack.csv lines of sampled images start..end-1], "successes",
# "evaluations", "search_rejections", "seconds", "settings_sha256" (its run's
# settings), "chunk_sha256" (its own content)}. A chunk is believed only when its
# content hash holds and its rows pass `read_attack_text`'s rules with its counts.
# Chunks written before chunks recorded these hashes are still read (`legacy`;
# and checked against attack_summary.json's `chunks_sha256` when it lists them).
# Where chunks are kept in a run directory, and what happens to one that fails,
# is the shell's (`experiments/runs/chunks.py`).

CONTENT_KEY = "chunk_sha256"


def chunk_sha256(chunk: dict) -> str:
    """SHA-256 of a chunk's content: canonical JSON of every entry but the hash
    itself (and the in-memory entries starting with "_")."""
    return hashing.settings_sha256(
        {k: v for k, v in chunk.items() if k != CONTENT_KEY and not k.startswith("_")}
    )


def chunk_problem(
    path: str,
    chunk: dict,
    target: int | None | str = UNKNOWN,
    image_shape: tuple[int, int] | None = None,
) -> str:
    """'' when the chunk's rows pass the row rules (`read_attack_text`) and its
    counts are those of its rows, else the first problem (one line)."""
    rows = chunk["rows"]
    if not rows:
        return "it holds no rows"
    fields = len(rows[0].split(","))
    pixels = (fields - len(BASE_COLUMNS)) // len(PIXEL_FIELDS)
    try:
        table = read_attack_text(
            path, csv_text(max(pixels, 1), rows), target, image_shape
        )
    except PropmapsError as e:
        return e.problem
    found = {
        "successes": int(table["success"].sum()),
        "evaluations": int(table["evaluations"].sum()),
    }
    for key, value in found.items():
        if chunk.get(key) != value:
            return f"{path} records {key} {chunk.get(key)!r} but its rows hold {value}"
    return ""


def read_chunk(
    path: str,
    data: bytes,
    expected_indices: np.ndarray,
    settings_hashes: Collection[str],
    legacy_ok: bool,
    recorded_sha256: str | None = None,
    target: int | None | str = UNKNOWN,
    image_shape: tuple[int, int] | None = None,
) -> tuple[dict | None, str]:
    """(chunk, "ok" | "legacy") when the chunk file's bytes `data` (`path` names it)
    hold exactly one row per
    expected index, in order, made under these settings (its hash one of
    `settings_hashes`: the run's, and with --sample=first those of the same run at
    other sample counts), whose content is as written and whose rows pass the row
    rules; (None, why) otherwise: "damaged" (unreadable, its content hash fails,
    another file than `recorded_sha256` (the summary's record), or rows that fail
    the rules or its counts), "bad" (rows of other images), "other" (another
    settings hash), "unproven" (no hash, and no matching settings.json to vouch for
    it).

    A chunk without its settings hash was written before chunks recorded one: it
    is taken ("legacy") only when `legacy_ok` (the run's settings.json matched). A
    chunk without its content hash ("legacy" too) is taken by its rows, and by its
    file's SHA-256 when the summary recorded one.
    """
    try:
        chunk = json.loads(data)
        rows = chunk["rows"]
        row_indices = [row_index(row) for row in rows]
        recorded = chunk.get("settings_sha256")
        content = chunk.get(CONTENT_KEY)
    except (ValueError, KeyError, TypeError, AttributeError):
        return None, "damaged"
    if content is not None and content != chunk_sha256(chunk):
        return None, "damaged"
    if (
        content is None
        and recorded_sha256 is not None
        and hashlib.sha256(data).hexdigest() != recorded_sha256
    ):
        return None, "damaged"
    if recorded is None:
        if not legacy_ok:
            return None, "unproven"
    elif recorded not in settings_hashes:
        return None, "other"
    if row_indices != [int(i) for i in expected_indices]:
        return None, "bad"
    if chunk_problem(path, chunk, target, image_shape):
        return None, "damaged"
    return chunk, "ok" if recorded and content else "legacy"


def chunk_outcomes(chunks: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """(generations, success) of the attacked images in chunk rows."""
    generations, success = [], []
    for chunk in chunks:
        for row in chunk["rows"]:
            values = row_values(row)
            if values["attacked"] == "1":
                generations.append(int(values["generations"]))
                success.append(values["success"] == "1")
    return np.asarray(generations, np.int64), np.asarray(success, bool)


def empty_chunk() -> dict[str, Any]:
    """A chunk with no rows yet, its counts at zero."""
    return {"rows": [], "successes": 0, "evaluations": 0, "search_rejections": 0}
