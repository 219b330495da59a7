"""Reading an attack run (propmaps_jax/results/attack_csv.py): every consumer of an
attack.csv refuses a run of another model, other weights or other data, a repeated
test image and a row that contradicts itself, with one line naming the file and the row.

Tiny runs are written by hand (no attack runs here), so these tests take a second.
"""

import csv
import json
import os
import re
import shutil

import numpy as np
import pytest

from propmaps_jax.errors import PropmapsError
from propmaps_jax.results import attack_csv as results
from propmaps_jax.results import provenance

MODEL = "lenet_tiny"


def _write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def _rows(labels):
    """A consistent untargeted run: success, failure, not attacked, success."""
    y = [int(v) for v in labels]
    return [
        [0, y[0], y[0], 0.9, 1, 1, (y[0] + 1) % 10, 0.2, 3, 1200, 3, 4, 10, 20, 30],
        [1, y[1], y[1], 0.8, 1, 0, y[1], 0.6, 100, 40400, 31, 0, 0, 0, 255],
        [2, y[2], (y[2] + 1) % 10, 0.1, 0, 0, (y[2] + 1) % 10, 0.1, 0, 0] + [-1] * 5,
        [4, y[4], y[4], 0.7, 1, 1, (y[4] + 2) % 10, 0.3, 1, 400, 0, 31, 255, 0, 0],
    ]


@pytest.fixture
def run(tmp_path):
    """An attack run in tmp_path/run made with weights tmp_path/w.msgpack."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, 6).astype(np.int64)
    weights = tmp_path / "w.msgpack"
    weights.write_bytes(b"weights of the attacked model")
    workdir = tmp_path / "run"
    workdir.mkdir()
    rows = _rows(labels)
    _write_csv(workdir / "attack.csv", results.attack_columns(1), rows)
    # As experiments/attack.py writes it: weights by content in the settings, the
    # file's path in the model record.
    summary = {
        "settings": {
            "target": None,
            **provenance.describe(MODEL, str(weights), images, labels),
        },
        "model": {"name": MODEL, "weights": str(weights)},
        "dataset": "/data/cifar10",
        "num_samples": 4,
        "attacked": 3,
        "successes": 2,
    }
    (workdir / "attack_summary.json").write_text(json.dumps(summary))
    return {
        "dir": str(workdir),
        "images": images,
        "labels": labels,
        "weights": str(weights),
        "rows": rows,
        "summary": summary,
        "tmp": tmp_path,
    }


def _load(run, model=MODEL, weights="given", images=None, labels=None):
    return results.load_attack_run(
        run["dir"],
        run["images"] if images is None else images,
        run["labels"] if labels is None else labels,
        model_name=model,
        weights=run["weights"] if weights == "given" else weights,
    )


def _rewrite(run, rows=None, header=None, summary=None):
    if rows is not None or header is not None:
        _write_csv(
            os.path.join(run["dir"], "attack.csv"),
            header or results.attack_columns(1),
            rows if rows is not None else run["rows"],
        )
    if summary is not None:
        with open(os.path.join(run["dir"], "attack_summary.json"), "w") as f:
            json.dump(summary, f)


def test_a_consistent_run_is_read(run):
    loaded = _load(run)
    table = loaded.table
    assert table["index"].tolist() == [0, 1, 2, 4]
    assert table["attacked"].tolist() == [True, True, False, True]
    assert table["success"].tolist() == [True, False, False, True]
    assert table["pixels"].shape == (4, 1, 5)
    assert table["pixels"][1, 0].tolist() == [31, 0, 0, 0, 255]
    assert loaded.weights_verified


def test_the_same_weights_under_another_path_are_accepted(run):
    copy = str(run["tmp"] / "elsewhere.msgpack")
    shutil.copy(run["weights"], copy)
    assert _load(run, weights=copy).table["index"].size == 4


def _set(row, column, value):
    row = list(row)
    row[results.attack_columns(1).index(column)] = value
    return row


# (row number to change, {column: value}, message); row numbers from 0, the
# message's line numbers count the header as line 1.
BAD_ROWS = [
    (3, {"index": 1}, "line 5: test image 1 appears again (first on line 3)"),
    (
        0,
        {"pred_after": "LABEL"},
        "line 2 (test image 0): success=1 but pred_after = label",
    ),
    (1, {"pred_after": "LABEL+1"}, "line 3 (test image 1): success=0 but pred_after"),
    (0, {"row_1": 32}, "line 2 (test image 0): pixel 1 at (32, 4) lies outside the "),
    (3, {"col_1": -1}, "line 5 (test image 4): pixel 1 at (0, -1) lies outside"),
    (0, {"g_1": 256}, "line 2 (test image 0): a pixel colour lies outside 0..255"),
    (1, {"attacked": 2}, "line 3 (test image 1): attacked is 2, not 0 or 1"),
    (2, {"success": 1}, "line 4 (test image 2): success=1 but attacked=0"),
    (2, {"row_1": 5}, "line 4 (test image 2): not attacked but its pixel columns"),
    (
        1,
        {"pred_before": "LABEL+1"},
        "line 3 (test image 1): attacked although pred_before",
    ),
    (
        2,
        {"pred_before": "LABEL", "pred_after": "LABEL"},
        "line 4 (test image 2): not attacked although correctly classified",
    ),
    (2, {"pred_after": "LABEL"}, "not attacked but pred_after"),
    (1, {"prob_true_after": 1.5}, "line 3 (test image 1): prob_true_after is 1.5"),
    (1, {"label": 1.5}, "line 3: label is 1.5, not an integer"),
    (1, {"label": "cat"}, "line 3: label is 'cat', not a number"),
    (1, {"generations": -3}, "line 3 (test image 1): generations is -3 < 0"),
    (3, {"index": 99}, "line 5 refers to test image 99 but the test set has 6"),
]


@pytest.mark.parametrize("row, change, message", BAD_ROWS)
def test_a_bad_row_is_refused_naming_file_and_line(run, row, change, message):
    rows = [list(r) for r in run["rows"]]
    label = rows[row][1]
    for column, value in change.items():
        if isinstance(value, str) and value.startswith("LABEL"):
            value = (label + (1 if value.endswith("+1") else 0)) % 10
        rows[row] = _set(rows[row], column, value)
    _rewrite(run, rows=rows)
    with pytest.raises(PropmapsError) as error:
        _load(run)
    text = str(error.value)
    assert os.path.join(run["dir"], "attack.csv") in text
    assert message in text, text
    assert "\n" not in text


def test_another_label_than_the_data_set_is_refused(run):
    labels = run["labels"].copy()
    labels[4] = (labels[4] + 1) % 10
    # Without recorded hashes (an older run) the labels still give it away.
    old = {**run["summary"], "settings": {"model": MODEL, "target": None}}
    _rewrite(run, summary=old)
    with pytest.raises(PropmapsError, match="line 5: test image 4 has label"):
        _load(run, labels=labels)


@pytest.mark.parametrize(
    "header, message",
    [
        (
            [c for c in results.attack_columns(1) if c != "success"],
            "does not have the columns of an attack.csv (missing success)",
        ),
        (
            results.attack_columns(1)[:-1] + ["blue_1"],
            "(missing b_1; unexpected blue_1)",
        ),
    ],
)
def test_missing_columns_are_named(run, header, message):
    rows = [r[: len(header)] for r in run["rows"]]
    _rewrite(run, rows=rows, header=header)
    with pytest.raises(PropmapsError, match=re.escape(message)):
        _load(run)


def test_a_short_row_is_named(run):
    rows = [list(r) for r in run["rows"]]
    rows[1] = rows[1][:-1]
    _rewrite(run, rows=rows)
    with pytest.raises(PropmapsError, match="line 3 has 14 fields, the header 15"):
        _load(run)


def test_counts_that_differ_from_the_summary_are_refused(run):
    # Rows of two runs put together (issue 13: "attacked: 1, successes: 4").
    _rewrite(run, summary={**run["summary"], "successes": 3})
    with pytest.raises(
        PropmapsError,
        match="holds successes 2 but its attack_summary.json says successes 3",
    ):
        _load(run)


def test_targeted_rows_follow_the_target(run):
    labels = run["labels"]
    target = min(set(range(10)) - set(labels[[0, 1, 4]].tolist()))
    rows = [list(r) for r in run["rows"]]
    rows[0] = _set(rows[0], "pred_after", target)
    # A failed targeted attack may still change the class (to another one).
    moved = min(set(range(10)) - {target, int(labels[1])})
    rows[1] = _set(rows[1], "pred_after", moved)
    rows[3] = _set(rows[3], "pred_after", target)
    settings = {**run["summary"]["settings"], "target": target}
    _rewrite(run, rows=rows, summary={**run["summary"], "settings": settings})
    assert _load(run).table["success"].tolist() == [True, False, False, True]
    rows[3] = _set(rows[3], "pred_after", labels[4])
    _rewrite(run, rows=rows)
    with pytest.raises(
        PropmapsError, match=f"succeeds when the class becomes {target}"
    ) as error:
        _load(run)
    assert "line 5 (test image 4): success=1 but pred_after is" in str(error.value)


def test_without_a_summary_the_rows_are_still_checked(run):
    os.remove(os.path.join(run["dir"], "attack_summary.json"))
    loaded = _load(run, model="resnet_tiny")  # nothing recorded to compare with
    assert not loaded.weights_verified
    rows = [list(r) for r in run["rows"]]
    rows[0] = _set(rows[0], "pred_after", rows[0][1])
    _rewrite(run, rows=rows)
    with pytest.raises(PropmapsError, match="success=1 but pred_after = label"):
        _load(run)


def test_another_model_is_refused_naming_the_flag(run):
    with pytest.raises(PropmapsError) as error:
        _load(run, model="resnet_tiny")
    assert str(error.value) == (
        f"the attack run in {run['dir']} was made with model 'lenet_tiny', not "
        f"'resnet_tiny'; pass --model=lenet_tiny and --weights={run['weights']}, "
        "as the attack did, or the --workdir of another attack run"
    )


def test_other_weights_are_refused_naming_the_flag(run):
    other = run["tmp"] / "other.msgpack"
    other.write_bytes(b"weights of another model")
    with pytest.raises(PropmapsError) as error:
        _load(run, weights=str(other))
    text = str(error.value)
    assert "was made with other weights (SHA-256 " in text
    assert f"pass --weights={run['weights']}, as the attack did" in text


def test_other_data_is_refused_naming_the_flag(run):
    images = run["images"].copy()
    images[5, 0, 0, 0] ^= 1  # one bit of an image that was not even sampled
    with pytest.raises(PropmapsError) as error:
        _load(run, images=images)
    text = str(error.value)
    assert "was made with other data (SHA-256 " in text
    assert "pass --cifar10_path=/data/cifar10, as the attack did" in text


def test_a_run_of_the_bundled_weights_says_so(run):
    # Made with the bundled checkpoint (its hash), given a weights file.
    settings = {**run["summary"]["settings"], "weights_sha256": "0" * 64}
    model = {"name": MODEL, "weights": "bundled checkpoint"}
    _rewrite(run, summary={**run["summary"], "settings": settings, "model": model})
    with pytest.raises(PropmapsError, match="no --weights \\(it used the bundled"):
        _load(run)
    # A summary of before the hashes: the path in its settings.
    old = {"settings": {**settings, "weights": None}}
    _rewrite(run, summary=old)
    with pytest.raises(PropmapsError, match="no --weights \\(it used the bundled"):
        _load(run)
    old["settings"]["weights"] = "/runs/lenet.msgpack"
    _rewrite(run, summary=old)
    with pytest.raises(PropmapsError, match="pass --weights=/runs/lenet.msgpack, as"):
        _load(run)


def test_an_older_summary_is_checked_by_model_only(run):
    old = {**run["summary"], "settings": {"model": MODEL, "target": None}}
    _rewrite(run, summary=old)
    other = run["tmp"] / "other.msgpack"
    other.write_bytes(b"weights of another model")
    assert not _load(run, weights=str(other)).weights_verified
    with pytest.raises(PropmapsError, match="made with model 'lenet_tiny'"):
        _load(run, model="lenet")


@pytest.mark.parametrize(
    "summary, message",
    [
        ("{not json", "attack_summary.json is not an attack summary"),
        ('{"settings": 3}', "attack_summary.json is not an attack summary"),
        (
            '{"settings": {"model": "lenet_tiny", "target": "all"}}',
            "holds a --target=all attack (one run per class): pass --workdir=",
        ),
    ],
)
def test_a_bad_or_aggregate_summary_is_refused(run, summary, message):
    with open(os.path.join(run["dir"], "attack_summary.json"), "w") as f:
        f.write(summary)
    with pytest.raises(PropmapsError, match=re.escape(message)):
        _load(run)


def test_a_missing_attack_csv(run):
    os.remove(os.path.join(run["dir"], "attack.csv"))
    with pytest.raises(PropmapsError, match="attack.csv does not exist: run the"):
        _load(run)
