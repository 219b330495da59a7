"""propmaps_jax.results: a committed attack.csv read with the package alone, the
row rules that test_attack_provenance.py leaves out refusing a hand-made bad row
in one line, and the chunk format's checks."""

import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT

from propmaps_jax import results
from propmaps_jax.errors import PropmapsError, RefusedFile
from propmaps_jax.results import attack_csv, hashing

COMMITTED = [
    os.path.join(ROOT, "docs", "results", "lenet_1000_cpu", "attack.csv"),
    os.path.join(ROOT, "docs", "results", "resnet_1000_cpu", "resnet", "attack.csv"),
]
HEADER = ",".join(attack_csv.attack_columns(1))
# An untargeted run: a success, a failure, an image misclassified before.
ROWS = [
    "3,1,1,0.9,1,1,4,0.2,5,2000,10,12,255,0,7",
    "7,2,2,0.8,1,0,2,0.7,100,40400,0,31,1,2,3",
    "9,5,3,0.1,0,0,3,0.1,0,0,-1,-1,-1,-1,-1",
]


def text_of(rows: list[str], header: str = HEADER) -> str:
    return "\n".join([header, *rows]) + "\n"


@pytest.mark.parametrize("path", COMMITTED, ids=["lenet", "resnet"])
def test_committed_attack_csv_reads_as_arrays(path):
    run = results.read_attack_results(path, image_shape=(32, 32))
    n = run.summary["num_samples"]
    assert len(run) == n and run.pixels.shape == (n, 1, 5)
    assert run.success.dtype == bool and run.attacked.dtype == bool
    assert int(run.success.sum()) == run.summary["successes"]
    assert int(run.attacked.sum()) == run.summary["attacked"]
    assert np.all(run.pixels[~run.attacked] == -1)
    assert np.all((run.pixels[run.attacked, :, :2] >= 0))
    assert np.all((run.prob_true_after >= 0) & (run.prob_true_after <= 1))
    # The folder names the same file.
    again = results.read_attack_results(os.path.dirname(path))
    np.testing.assert_array_equal(again.index, run.index)


def test_the_library_reads_without_the_shell():
    """`pip install` ships propmaps_jax alone: no results module imports the
    experiments."""
    code = (
        "import sys; from propmaps_jax import results; "
        "from propmaps_jax.results import claims_json, controls_csv, locality_csv; "
        f"results.read_attack_results({COMMITTED[0]!r}); "
        "assert not [m for m in sys.modules if m.startswith('experiments')]"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_a_valid_table_reads_back():
    table = attack_csv.read_attack_text("x.csv", text_of(ROWS), None, (32, 32))
    np.testing.assert_array_equal(table["index"], [3, 7, 9])
    np.testing.assert_array_equal(table["success"], [True, False, False])
    assert table["pixels"].shape == (3, 1, 5)
    assert table["pixels"][0, 0].tolist() == [10, 12, 255, 0, 7]
    # Written and read back, byte for byte.
    values = [9, 5, 3, 0.1, 0, 0, 3, 0.1, 0, 0, -1, -1, -1, -1, -1]
    assert attack_csv.csv_text(1, [attack_csv.format_row(values)]) == text_of(ROWS[2:])
    assert attack_csv.row_index(ROWS[1]) == 7
    assert attack_csv.row_values(ROWS[0])["generations"] == "5"


def edit(row: int, **values) -> list[str]:
    """ROWS with the columns `values` of row `row` replaced."""
    columns = attack_csv.attack_columns(1)
    fields = ROWS[row].split(",")
    for name, value in values.items():
        fields[columns.index(name)] = str(value)
    return [",".join(fields) if i == row else r for i, r in enumerate(ROWS)]


# The rules that tests/lib/test_attack_provenance.py's BAD_ROWS (through
# load_attack_run) leaves out; together they cover every rule of read_attack_text.
BAD = {
    "index": (edit(0, index=-4), None, "index is -4 < 0"),
    "label": (edit(2, label=-1, pred_before=-1, pred_after=-1), None, "< 0"),
    "success flag": (edit(1, success=3), None, "success is 3, not 0 or 1"),
    "evaluations": (edit(0, evaluations=-1), None, "evaluations is -1 < 0"),
    "not finite": (edit(0, prob_true_after="nan"), None, "not a finite number"),
    "target class attacked": (ROWS, 2, "its label is the target class 2"),
}


@pytest.mark.parametrize("rows, target, message", BAD.values(), ids=BAD.keys())
def test_each_row_rule_refuses_in_one_line(rows, target, message):
    with pytest.raises(PropmapsError) as error:
        attack_csv.read_attack_text("x.csv", text_of(rows), target, (32, 32))
    said = str(error.value)
    assert message in said and "\n" not in said
    assert said.startswith("x.csv line ")


def test_header_and_summary_counts_refused_in_one_line(tmp_path):
    with pytest.raises(PropmapsError, match="missing b_1"):
        attack_csv.read_attack_text("x.csv", text_of([], HEADER[: -len(",b_1")]))
    with pytest.raises(PropmapsError, match="is empty"):
        attack_csv.read_attack_text("x.csv", "")
    path = tmp_path / "attack.csv"
    path.write_text(text_of(ROWS))
    summary = {"num_samples": 3, "attacked": 2, "successes": 2, "settings": {}}
    (tmp_path / "attack_summary.json").write_text(json.dumps(summary))
    with pytest.raises(PropmapsError, match="holds successes 1 but its"):
        results.read_attack_results(str(path))
    summary["successes"] = 1
    summary["attack_csv_sha256"] = hashing.text_sha256(text_of(ROWS))
    (tmp_path / "attack_summary.json").write_text(json.dumps(summary))
    assert len(results.read_attack_results(str(tmp_path))) == 3
    # Read once: the rows, and the SHA-256 of the very bytes they came from.
    table, sha256 = attack_csv.read_recorded_csv(str(path), summary, (32, 32))
    assert sha256 == summary["attack_csv_sha256"] and table["index"].tolist() == [
        3,
        7,
        9,
    ]
    path.write_text(text_of(ROWS[:2]))
    with pytest.raises(PropmapsError, match="not the file its attack run wrote"):
        results.read_attack_results(str(path))
    path.unlink()
    with pytest.raises(PropmapsError, match="attack.csv is missing; run the same"):
        results.read_attack_results(str(path))


def test_one_set_of_row_rules_for_chunks_and_attack_csv():
    """The attack's chunks and every reader of attack.csv go through the same
    function (`read_attack_text`): a row that contradicts itself is named the
    same way in both."""
    with open(COMMITTED[0]) as f:
        lines = f.read().splitlines()
    attacked = next(
        i for i, line in enumerate(lines[1:], 1) if line.split(",")[4] == "1"
    )
    fields = lines[attacked].split(",")
    fields[10] = "40"  # a pixel row outside the 32x32 image
    row = ",".join(fields)
    with pytest.raises(PropmapsError, match="lies outside the 32x32 image"):
        attack_csv.read_attack_text(
            "x.csv", "\n".join([lines[0], row]) + "\n", None, (32, 32)
        )
    chunk = {"rows": [row], "successes": int(fields[5]), "evaluations": int(fields[9])}
    assert "lies outside the 32x32 image" in attack_csv.chunk_problem(
        "c.json", chunk, None, (32, 32)
    )


def chunk_bytes(chunk: dict) -> bytes:
    return json.dumps(
        {**chunk, "chunk_sha256": attack_csv.chunk_sha256(chunk)}
    ).encode()


def test_read_chunk_believes_only_a_chunk_as_written():
    chunk = {**attack_csv.empty_chunk(), "rows": ROWS[:2], "settings_sha256": "s"}
    chunk.update(successes=1, evaluations=42400)
    data, indices = chunk_bytes(chunk), np.array([3, 7])
    read, kind = attack_csv.read_chunk("c.json", data, indices, {"s"}, False)
    assert kind == "ok" and read["rows"] == ROWS[:2]
    generations, success = attack_csv.chunk_outcomes([read])
    assert generations.tolist() == [5, 100] and success.tolist() == [True, False]
    edited = data.replace(b"40400", b"40401")
    assert attack_csv.read_chunk("c.json", edited, indices, {"s"}, False) == (
        None,
        "damaged",
    )
    assert attack_csv.read_chunk("c.json", data[:-5], indices, {"s"}, False)[1] == (
        "damaged"
    )
    assert attack_csv.read_chunk("c.json", data, indices, {"t"}, False)[1] == "other"
    assert attack_csv.read_chunk("c.json", data, indices[::-1], {"s"}, False)[1] == (
        "bad"
    )
    wrong_counts = chunk_bytes({**chunk, "successes": 2})
    assert attack_csv.read_chunk("c.json", wrong_counts, indices, {"s"}, False)[1] == (
        "damaged"
    )
    # Written before chunks recorded hashes: taken only when vouched for.
    legacy = json.dumps({k: v for k, v in chunk.items() if k != "settings_sha256"})
    legacy = legacy.encode()
    assert attack_csv.read_chunk("c.json", legacy, indices, {"s"}, False)[1] == (
        "unproven"
    )
    assert attack_csv.read_chunk("c.json", legacy, indices, {"s"}, True)[1] == "legacy"


def test_settings_hash_is_canonical_json():
    settings = {"b": 1, "a": [np.int64(2), float("nan")], "c": np.float32(0.5)}
    canonical = '{"a":[2,null],"b":1,"c":0.5}'
    assert hashing.settings_sha256(settings) == hashing.text_sha256(canonical)


def test_a_refused_file_gives_its_problem_and_its_remedy_apart(tmp_path):
    """One line for the user (problem, then what to do); the problem alone for a
    caller that acts on it itself (the attack rebuilds a finished run's file)."""
    path = tmp_path / "attack.csv"
    path.write_text("")
    with pytest.raises(RefusedFile) as refused:
        attack_csv.read_attack_csv(str(path))
    error = refused.value
    assert error.problem == f"{path} is empty"
    assert str(error) == f"{error.problem}: {error.remedy}"
    assert error.remedy.startswith("run the attack again")
    # Other errors keep their remedy in their one message: that is their problem.
    assert PropmapsError("x is wrong: do y").problem == "x is wrong: do y"
    again = pickle.loads(pickle.dumps(error))
    assert (str(again), again.problem, again.remedy) == (
        str(error),
        error.problem,
        error.remedy,
    )
