"""The salience study as a library call (`propmaps_jax.analysis.salience.
study_attacks`) and its files (`propmaps_jax.results.salience_csv`), called as an
installed user calls them on a tiny LeNet and random images; the predictions and
the propagation-map measures are checked against the model's own forward pass and
`models.layer_outputs` in float64, the counts by hand."""

import csv
import io

import numpy as np
import pytest

from propmaps_jax import models
from propmaps_jax.analysis import salience as salience_study
from propmaps_jax.analysis import saliency
from propmaps_jax.errors import PropmapsError
from propmaps_jax.results import salience_csv

INDICES = np.array([3, 8, 1, 5, 0, 7])
SUCCESS = np.array([True, False, True, True, False, True])


@pytest.fixture(scope="module")
def study(tiny_lenet):
    module, variables = tiny_lenet
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(6, 32, 32, 3), dtype=np.uint8)
    labels = np.array([3, 1, 0, 9, 4, 2], np.int32)
    pixels = np.array([[[5 * i, 31 - 4 * i, 255, 40 * i, 0]] for i in range(6)])
    changes, _ = saliency.change_positions(0, INDICES, pixels, 32, 32)
    out = salience_study.study_attacks(
        models.linen_features(module),
        variables,
        INDICES,
        images,
        labels,
        changes,
        SUCCESS,
        seed=0,
        batch_size=4,
        resamples=100,
        examples=1,
    )
    return out, pixels


def test_the_study_against_the_model_and_its_feature_maps(study, tiny_lenet):
    module, variables = tiny_lenet
    out, pixels = study
    assert out.last_layer == "conv2" and out.last_shape == (10, 10, 4)
    for i in range(6):
        changed = np.repeat(out.images[i][None], 4, axis=0)
        for j in range(3):
            row, col, *colour = out.changes[i, j]
            changed[1 + j, row, col] = colour
        logits, layers = models.layer_outputs(
            module, variables, changed.astype(np.float32)
        )
        preds = np.argmax(np.asarray(logits), -1)
        assert out.results["pred_before"][i] == preds[0]
        np.testing.assert_array_equal(out.results["pred_after"][i], preds[1:])
        fm = np.asarray(layers["conv2"], np.float64)
        pm = np.abs(fm[0] - fm[1:]).max(-1)
        np.testing.assert_allclose(
            out.results["pm_last_max"][i], pm.max((1, 2)), rtol=1e-4, atol=1e-4
        )
        np.testing.assert_allclose(
            out.results["pm_last_mean"][i], pm.mean((1, 2)), rtol=1e-4, atol=1e-5
        )
    # The attack's predictions (attack.csv's pred_before, pred_after).
    predicted = salience_study.attack_predictions(
        models.make_apply_fn(module), variables, out.images, pixels
    )
    np.testing.assert_array_equal(predicted[0], out.results["pred_before"])
    np.testing.assert_array_equal(predicted[1], out.results["pred_after"][:, 0])
    changed = out.results["pred_after"] != out.labels[:, None]
    assert out.class_changed() == dict(
        zip(saliency.CHANGES, map(int, changed.sum(0)), strict=True)
    )


def test_the_table_groups_and_examples(study):
    out, _ = study
    assert [r["id"] for r in out.rows] == ["P1a", "P1b"] * 2 + ["P2"] * 4 + ["P3"] * 4
    # Four successful and two failed attacks: too few for a verdict.
    assert {r["verdict"] for r in out.rows} == {"inconclusive"}
    assert out.rows[0]["n"] == 6 and out.rows[1]["n"] == 4
    capture = out.capture()["true"]
    assert {g: len(capture[g]["after"]) for g in capture} == {
        "successful": 4,
        "failed": 2,
        "nearby": 4,
        "random": 4,
    }
    np.testing.assert_array_equal(
        capture["failed"]["before"], out.results["true_capture3_before"][~SUCCESS, 0]
    )
    assert out.groups["successful"]["pm_last_max"]["n"] == 4
    np.testing.assert_allclose(
        out.groups["failed"]["pm_last_max"]["mean"],
        out.results["pm_last_max"][~SUCCESS, 0].mean(),
    )
    np.testing.assert_array_equal(out.chosen, [0, 1])  # first success, first failure
    assert out.example_maps["maps_before_true"].shape[:2] == (2, 3)


def test_per_image_and_table_csv(study):
    out, _ = study
    from_locality = np.array([True, False, False, True, False, False])
    rows = list(
        csv.DictReader(io.StringIO(salience_csv.per_image_csv(out, from_locality)))
    )
    assert list(rows[0]) == salience_csv.PER_IMAGE_COLUMNS
    assert len(rows) == 18
    assert [r["change"] for r in rows[:3]] == list(saliency.CHANGES)
    assert [r["positions_from"] for r in rows[:6]] == [
        "attack",
        "locality",
        "locality",
        "attack",
        "drawn",
        "drawn",
    ]
    assert [r["outcome"] for r in rows[::3]] == [
        "successful" if s else "failed" for s in SUCCESS
    ]
    assert [int(r["index"]) for r in rows[::3]] == list(INDICES)
    r = rows[4]  # image 1, nearby
    assert [int(r[c]) for c in ("row", "col", "r", "g", "b")] == list(out.changes[1, 1])
    assert float(r["pm_last_max"]) == pytest.approx(
        out.results["pm_last_max"][1, 1], rel=1e-5
    )
    table = list(csv.DictReader(io.StringIO(salience_csv.table_csv(out.rows))))
    assert list(table[0]) == list(out.rows[0]) and len(table) == 12


def test_the_files_read_back(study, tmp_path):
    out, _ = study
    from_locality = np.zeros(6, bool)
    (tmp_path / "per_image.csv").write_text(
        salience_csv.per_image_csv(out, from_locality)
    )
    (tmp_path / "table.csv").write_text(salience_csv.table_csv(out.rows))
    per_image = salience_csv.read_per_image(str(tmp_path / "per_image.csv"))
    np.testing.assert_array_equal(per_image["index"], np.repeat(INDICES, 3))
    np.testing.assert_array_equal(
        per_image["pred_after"], out.results["pred_after"].ravel()
    )
    np.testing.assert_allclose(
        per_image["true_spearman"], out.results["true_spearman"].ravel(), rtol=1e-5
    )
    assert per_image["change"][:3].tolist() == list(saliency.CHANGES)
    table = salience_csv.read_table(str(tmp_path / "table.csv"))
    assert [r["id"] for r in table] == [r["id"] for r in out.rows]
    for got, row in zip(table, out.rows, strict=True):
        assert got["n"] == row["n"] and got["verdict"] == row["verdict"]
        np.testing.assert_allclose(got["estimate"], row["estimate"], rtol=1e-12)


def _locality_csv(path, rows):
    header = ["index", "label", "row", "col", "r", "g", "b"]
    header += ["nearby_row", "nearby_col", "nearby_pred", "nearby_success"]
    header += ["random_row", "random_col", "random_pred", "random_success"]
    lines = [",".join(header)] + [",".join(map(str, r)) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_locality_positions_are_read_and_checked(tmp_path):
    indices = np.array([4, 9])
    pixels = np.array([[[2, 3, 255, 0, 0]], [[7, 7, 0, 0, 0]]])
    success = np.array([True, False])
    path = _locality_csv(
        tmp_path / "ok.csv", [[4, 1, 2, 3, 255, 0, 0, 3, 3, 0, 0, 20, 5, 1, 0]]
    )
    got = salience_csv.locality_positions(path, indices, pixels, success, 32, 32)
    assert got == {4: (3, 3, 20, 5)}
    with pytest.raises(PropmapsError, match="outside the 16x16 image"):
        salience_csv.locality_positions(path, indices, pixels, success, 16, 16)
    with pytest.raises(PropmapsError, match="has 1 rows but attack.csv 2 successful"):
        salience_csv.locality_positions(
            path, indices, pixels, ~success | success, 32, 32
        )
    other = _locality_csv(
        tmp_path / "other.csv", [[4, 1, 2, 3, 0, 0, 0, 3, 3, 0, 0, 20, 5, 1, 0]]
    )
    with pytest.raises(PropmapsError, match="does not match attack.csv .test image 4."):
        salience_csv.locality_positions(other, indices, pixels, success, 32, 32)
