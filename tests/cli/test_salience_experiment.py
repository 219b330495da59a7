"""The salience experiment on a tiny LeNet and a small hand-made attack run.

One run goes through launch.py (in process); its numbers are checked against an
independent computation (jax.grad of the module, NumPy windows, SciPy ranks), and
bad input is checked both through launch.py (one line, exit 2) and in-process
through `salience.run` (experiments/salience.py defines only flags of its own);
the verdict rule is `propmaps_jax.analysis.salience.verdict`.
"""

import csv
import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from conftest import launch

from experiments import salience
from propmaps_jax import data, models
from propmaps_jax.analysis import locality
from propmaps_jax.analysis import salience as salience_study
from propmaps_jax.analysis.saliency import SaliencyConfig
from propmaps_jax.errors import PropmapsError
from propmaps_jax.results import provenance
from propmaps_jax.results.attack_csv import attack_columns
from tests._fixtures import save_lenet_tiny

NUM_IMAGES = 12
NOT_ATTACKED = (3, 9)


def run_launch(*args):
    return launch("--experiment=salience", *args, env={"CIFAR10_PATH": None})


def _write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """lenet_tiny, images with small margins, an attack run made by that model.

    Successful attacks use a candidate pixel that flips the class, failed ones a
    candidate that does not; a locality.csv gives the moves of successful attacks.
    """
    folder = tmp_path_factory.mktemp("salience")
    weights = str(folder / "lenet_tiny.msgpack")
    module, variables = save_lenet_tiny(weights, 3)
    logits_fn = jax.jit(models.make_logits_fn(module, variables))
    rng = np.random.default_rng(0)
    pool = rng.integers(0, 256, (256, 32, 32, 3), dtype=np.uint8)
    logits = np.asarray(logits_fn(pool))
    top2 = np.sort(logits, axis=1)[:, -2:]
    x = pool[np.argsort(top2[:, 1] - top2[:, 0])[:NUM_IMAGES]]
    pred = np.asarray(logits_fn(x)).argmax(1)
    y = pred.copy()
    for i in NOT_ATTACKED:
        y[i] = (y[i] + 1) % 10
    np.savez(folder / "data.npz", x_train=x[:2], y_train=y[:2], x_test=x, y_test=y)

    candidates = np.concatenate(
        [
            rng.integers(2, 30, (NUM_IMAGES, 64, 2)),
            rng.choice([0, 255], (NUM_IMAGES, 64, 3)),
        ],
        axis=-1,
    )
    rows, successes = [], []
    for i in range(NUM_IMAGES):
        if i in NOT_ATTACKED:
            rows.append([i, y[i], pred[i], 0.1, 0, 0, pred[i], 0.1, 0, 0] + [-1] * 5)
            continue
        changed = np.repeat(x[i : i + 1], 64, axis=0)
        for j, (r, c, *rgb) in enumerate(candidates[i]):
            changed[j, r, c] = rgb
        after = np.asarray(logits_fn(changed)).argmax(1)
        flips = np.flatnonzero(after != y[i])
        keeps = np.flatnonzero(after == y[i])
        want_success = len(successes) % 2 == 0 and len(flips) > 0
        j = int(flips[0] if want_success or not len(keeps) else keeps[0])
        success = bool(after[j] != y[i])
        successes.append(success)
        rows.append(
            [i, y[i], pred[i], 0.5, 1, int(success), after[j], 0.4, 5, 50]
            + [int(v) for v in candidates[i, j]]
        )
    assert 3 <= sum(successes) <= len(successes) - 3, successes
    workdir = folder / "run"
    workdir.mkdir()
    _write_csv(workdir / "attack.csv", attack_columns(1), rows)
    with open(workdir / "attack_summary.json", "w") as f:
        json.dump({"settings": {"model": "lenet_tiny", "weights": weights}}, f)
    # locality.csv: nearby one row down (or up), random at a corner, by hand.
    locality_rows, moves = [], {}
    for row in rows:
        if not row[5]:
            continue
        r, c = row[10], row[11]
        nearby = (r + 1 if r < 31 else r - 1, c)
        random = (0, 0) if (r, c) != (0, 0) else (31, 31)
        moves[row[0]] = (nearby, random)
        locality_rows.append(
            [row[0], row[1], *row[10:15], *nearby, 0, 0, *random, 0, 0, 8, 0]
        )
    _write_csv(
        workdir / "locality.csv",
        ["index", "label", "row", "col", "r", "g", "b"]
        + ["nearby_row", "nearby_col", "nearby_pred", "nearby_success"]
        + ["random_row", "random_col", "random_pred", "random_success"]
        + ["ring1_n", "ring1_success"],
        locality_rows,
    )
    return {
        "folder": folder,
        "workdir": str(workdir),
        "weights": weights,
        "data": str(folder / "data.npz"),
        "module": module,
        "variables": variables,
        "x": x,
        "y": y,
        "rows": rows,
        "moves": moves,
    }


@pytest.fixture(scope="module")
def finished(setup):
    """The experiment through launch.py; the model comes from attack_summary.json."""
    proc = run_launch(
        f"--workdir={setup['workdir']}",
        f"--cifar10_path={setup['data']}",
        "--batch_size=4",
        "--bootstrap=200",
        "--examples=2",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = os.path.join(setup["workdir"], "salience")
    with open(os.path.join(out, "per_image.csv")) as f:
        per_image = list(csv.DictReader(f))
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    return proc, out, per_image, summary


def test_writes_every_output(finished, setup):
    proc, out, per_image, summary = finished
    for name in ("examples.png", "attention_capture.png", "roc.png"):
        with open(os.path.join(out, name), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", name
    attacked = [r for r in setup["rows"] if r[4]]
    assert len(per_image) == 3 * len(attacked)
    assert [r["change"] for r in per_image[:3]] == ["original", "nearby", "random"]
    assert summary["settings"]["model"] == "lenet_tiny"
    assert summary["settings"]["attacks"] == len(attacked)
    assert summary["settings"]["successful"] == sum(r[5] for r in attacked)
    assert summary["attack_csv_mismatches"] == 0
    table = open(os.path.join(out, "table.md")).read()
    with open(os.path.join(out, "table.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [r["id"] for r in rows] == ["P1a", "P1b"] * 2 + ["P2"] * 4 + ["P3"] * 4
    for row in rows:
        assert row["verdict"] in ("supported", "not supported", "inconclusive")
        assert f"**{row['verdict']}**" in table
        assert row["verdict"] == salience_study.verdict(
            float(row["estimate"]),
            float(row["ci_low"]),
            float(row["ci_high"]),
            {"P1a": "capture", "P1b": "capture", "P2": "auc", "P3": "spearman"}[
                row["id"]
            ],
            int(row["n"]),
        )
    assert "Rule (applied by the code" in table
    assert "attacks/s" in proc.stderr  # progress lines


def test_positions_from_locality_csv_or_drawn(finished, setup):
    _, _, per_image, _ = finished
    key = jax.random.fold_in(jax.random.key(0), locality.LOCALITY_STREAM)
    for r in per_image:
        index, change = int(r["index"]), r["change"]
        position = (int(r["row"]), int(r["col"]))
        if change == "original":
            assert r["positions_from"] == "attack"
            continue
        pixel = np.array([[[setup["rows"][index][10], setup["rows"][index][11]]]])
        if r["outcome"] == "successful":
            assert r["positions_from"] == "locality"
            assert position == setup["moves"][index][change == "random"]
            continue
        # Failed attacks: drawn as the locality experiment draws them.
        assert r["positions_from"] == "drawn"
        sample = (
            locality.sample_nearby if change == "nearby" else locality.sample_random
        )
        stream = (
            locality.NEARBY_STREAM if change == "nearby" else locality.RANDOM_STREAM
        )
        drawn = sample(
            jax.random.fold_in(key, stream),
            np.array([index]),
            pixel[:, 0, 0],
            pixel[:, 0, 1],
            32,
            32,
        )
        assert position == (int(drawn[0][0]), int(drawn[1][0]))


def test_numbers_against_an_independent_computation(finished, setup):
    _, _, per_image, summary = finished
    module, variables = setup["module"], setup["variables"]

    def gradient_map(image, cls):  # max over channels of |d logit / d x|
        grad = jax.grad(
            lambda x: module.apply(variables, x[None], train=False)[0, cls]
        )(jnp.asarray(image, jnp.float32))
        return np.abs(np.asarray(grad, np.float64)).max(-1)

    def share(m, r, c, half):
        return m[max(r - half, 0) : r + half + 1, max(c - half, 0) : c + half + 1].sum()

    def top(m, k=52):
        return set(np.argsort(-m.ravel(), kind="stable")[:k])

    # One successful and one failed attack, every change of each.
    picked = [r for r in per_image if r["outcome"] == "successful"][:3]
    picked += [r for r in per_image if r["outcome"] == "failed"][:3]
    for r in picked:
        index, label = int(r["index"]), int(r["label"])
        clean = setup["x"][index]
        changed = clean.copy()
        changed[int(r["row"]), int(r["col"])] = [int(r["r"]), int(r["g"]), int(r["b"])]
        logits, layers = models.layer_outputs(
            module, variables, np.stack([clean, changed]).astype(np.float32)
        )
        pred = int(np.argmax(logits[1]))
        assert int(r["pred_after"]) == pred
        assert int(r["class_changed"]) == int(pred != label)
        fm = np.asarray(layers["conv2"], np.float64)
        pm = np.abs(fm[0] - fm[1]).max(-1)
        np.testing.assert_allclose(float(r["pm_last_max"]), pm.max(), rtol=1e-4)
        np.testing.assert_allclose(float(r["pm_last_mean"]), pm.mean(), rtol=1e-4)
        for cls_name, cls in (("true", label), ("new", pred)):
            before, after = gradient_map(clean, cls), gradient_map(changed, cls)
            for size in (3, 5):
                for when, m in (("before", before), ("after", after)):
                    expected = share(m, int(r["row"]), int(r["col"]), size // 2)
                    np.testing.assert_allclose(
                        float(r[f"{cls_name}_capture{size}_{when}"]),
                        expected / m.sum(),
                        rtol=1e-3,
                        atol=1e-6,
                    )
            rho = scipy.stats.spearmanr(before.ravel(), after.ravel()).statistic
            np.testing.assert_allclose(float(r[f"{cls_name}_spearman"]), rho, atol=1e-4)
            overlap = len(top(before) & top(after)) / 52
            np.testing.assert_allclose(float(r[f"{cls_name}_top5"]), overlap, atol=1e-6)

    # P2's point estimate: the AUC of every (changed, unchanged) pair, by brute force.
    changed = np.array([int(r["class_changed"]) for r in per_image], bool)
    scores = 1.0 - np.array([float(r["true_spearman"]) for r in per_image])
    pos, neg = scores[changed], scores[~changed]
    pairs = (pos[:, None] > neg[None]) + 0.5 * (pos[:, None] == neg[None])
    row = [
        p
        for p in summary["predictions"]
        if p["id"] == "P2" and p["class"] == "true" and "Spearman" in p["measure"]
    ][0]
    np.testing.assert_allclose(row["estimate"], pairs.mean(), rtol=1e-6)


def test_verdict_rule():
    assert salience_study.verdict(0.7, 0.65, 0.75, "auc", 50) == "supported"
    assert salience_study.verdict(0.55, 0.52, 0.58, "auc", 50) == "not supported"
    assert salience_study.verdict(0.4, 0.3, 0.45, "auc", 50) == "not supported"
    assert salience_study.verdict(0.6, 0.45, 0.75, "auc", 50) == "inconclusive"
    assert (
        salience_study.verdict(0.02, float("nan"), 0.03, "capture", 50)
        == "inconclusive"
    )
    assert salience_study.verdict(0.7, 0.65, 0.75, "auc", 9) == "inconclusive"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--saliency=occlusion"], "--saliency='occlusion' is unknown; choose one of"),
        (["--steps=0"], "--steps must be at least 1, got 0"),
        (["--workdir=EMPTY"], "attack.csv does not exist: run the attack first"),
    ],
)
def test_bad_flags_through_launch(setup, args, message):
    empty = setup["folder"] / "empty"
    args = [a.replace("EMPTY", str(empty)) for a in args]
    if not any(a.startswith("--workdir") for a in args):
        args.append(f"--workdir={setup['workdir']}_copy_never_made")
    proc = run_launch(*args, f"--cifar10_path={setup['data']}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, last
    assert "Traceback" not in proc.stderr
    assert not os.path.exists(os.path.join(str(empty), "salience"))


def _copy_run(setup, name):
    workdir = str(setup["folder"] / name)
    shutil.copytree(
        setup["workdir"], workdir, ignore=shutil.ignore_patterns("salience")
    )
    return workdir


def _run(setup, workdir, **kwargs):
    dataset = kwargs.pop("dataset", None) or data.load_cifar10(setup["data"])
    args = {
        "model_name": "lenet_tiny",
        "weights": setup["weights"],
        "config": SaliencyConfig(),
        "resamples": 100,
        "examples": 0,
    }
    args.update(kwargs)
    salience.run(salience.SalienceConfig(workdir, **args), dataset)


def test_attack_run_of_another_model_is_refused(setup):
    workdir = _copy_run(setup, "other_model")
    with pytest.raises(
        PropmapsError,
        match="was made with model 'lenet_tiny', not 'resnet_tiny'; pass "
        "--model=lenet_tiny",
    ):
        _run(setup, workdir, model_name="resnet_tiny")
    # Same architecture, other weights: the stored predictions do not match.
    os.remove(os.path.join(workdir, "attack_summary.json"))
    other = str(setup["folder"] / "other.msgpack")
    save_lenet_tiny(other, 11)
    with pytest.raises(PropmapsError, match="was not made by this model"):
        _run(setup, workdir, weights=other)
    assert not os.path.exists(os.path.join(workdir, "salience"))


def test_attack_run_recorded_with_other_weights_or_data_is_refused(setup):
    """A summary with the run's provenance (weights and data by content)."""
    workdir = _copy_run(setup, "provenance")
    dataset = data.load_cifar10(setup["data"])
    x_test, y_test = dataset.split("test")
    path = os.path.join(workdir, "attack_summary.json")
    with open(path) as f:
        summary = json.load(f)
    summary["settings"].update(
        provenance.describe("lenet_tiny", setup["weights"], x_test, y_test)
    )
    summary["dataset"] = setup["data"]
    with open(path, "w") as f:
        json.dump(summary, f)
    copy = str(setup["folder"] / "same_weights_elsewhere.msgpack")
    shutil.copy(setup["weights"], copy)
    other = str(setup["folder"] / "other_weights.msgpack")
    save_lenet_tiny(other, 12)
    # Refused before the model is loaded or anything is computed.
    with pytest.raises(PropmapsError, match="was made with other weights"):
        _run(setup, workdir, weights=other)
    y_other = y_test.copy()
    y_other[9] = (y_other[9] + 1) % 10  # one label changed
    other_data = dataclasses.replace(dataset, y_test=y_other)
    with pytest.raises(
        PropmapsError,
        match=f"was made with other data .*; pass --cifar10_path={setup['data']}",
    ):
        _run(setup, workdir, dataset=other_data)
    assert not os.path.exists(os.path.join(workdir, "salience"))
    # The same weights under another path are the same run.
    _run(setup, workdir, weights=copy)
    assert os.path.isfile(os.path.join(workdir, "salience", "table.md"))


def test_changed_columns_are_refused(setup):
    workdir = _copy_run(setup, "changed_columns")
    path = os.path.join(workdir, "attack.csv")
    text = open(path).read()
    with open(path, "w") as f:
        f.write(text.replace("pred_after", "prediction_after", 1))
    with pytest.raises(PropmapsError, match="does not have the columns"):
        _run(setup, workdir)
    with open(path, "w") as f:
        f.write(text)
    locality_csv = os.path.join(workdir, "locality.csv")
    text = open(locality_csv).read()
    with open(locality_csv, "w") as f:
        f.write(text.replace("random_col", "random_column", 1))
    with pytest.raises(PropmapsError, match="lacks the column"):
        _run(setup, workdir)
    rows = list(csv.reader(text.splitlines()))
    rows[1][rows[0].index("random_row")] = "32"
    _write_csv(locality_csv, rows[0], rows[1:])
    with pytest.raises(PropmapsError, match="outside the 32x32 image"):
        _run(setup, workdir)
    assert not os.path.exists(os.path.join(workdir, "salience"))


def test_results_do_not_depend_on_the_batch_size(finished, setup):
    _, _, per_image, _ = finished  # --batch_size=4 (padded chunks)
    workdir = _copy_run(setup, "one_batch")
    _run(setup, workdir, batch_size=16)
    with open(os.path.join(workdir, "salience", "per_image.csv")) as f:
        again = list(csv.DictReader(f))
    assert [r["index"] for r in again] == [r["index"] for r in per_image]
    for a, b in zip(per_image, again, strict=True):
        for name, value in a.items():
            try:
                np.testing.assert_allclose(
                    float(b[name]), float(value), rtol=1e-4, atol=1e-6, err_msg=name
                )
            except ValueError:
                assert b[name] == value, name


@pytest.mark.parametrize(
    "summary, given, expected",
    [
        # As experiments/attack.py writes it now: the weights path in "model".
        (
            {"settings": {"model": "lenet"}, "model": {"weights": "/w/lenet.msgpack"}},
            ("resnet", False, None),
            ("lenet", "/w/lenet.msgpack"),
        ),
        (
            {
                "settings": {"model": "lenet"},
                "model": {"weights": "bundled checkpoint"},
            },
            ("resnet", False, None),
            ("lenet", None),
        ),
        # Older runs: the path in the settings.
        (
            {"settings": {"model": "lenet", "weights": "/w/old.msgpack"}},
            ("resnet", False, None),
            ("lenet", "/w/old.msgpack"),
        ),
        # Flags given win (and the run is then checked against them).
        (
            {"settings": {"model": "lenet"}, "model": {"weights": "/w/lenet.msgpack"}},
            ("resnet", True, "/w/mine.msgpack"),
            ("resnet", "/w/mine.msgpack"),
        ),
        (None, ("resnet", False, None), ("resnet", None)),
    ],
)
def test_model_and_weights_come_from_the_attack_summary(
    tmp_path, summary, given, expected
):
    if summary is not None:
        (tmp_path / "attack_summary.json").write_text(json.dumps(summary))
    assert salience.resolve_model(str(tmp_path), *given) == expected
