"""Tiny runs of the propagation and statistics experiments, and their figures.

The experiments run end to end through launch.py (in process), as a user runs
them; the figures themselves are tested in tests/lib/test_figures.py, one
attack's maps and a paper figure's record in tests/lib/test_paper_examples.py.
"""

import csv
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import launch

from propmaps_jax import models
from propmaps_jax.analysis import claims, propagation
from propmaps_jax.attack.perturb import apply_pixels_batch
from propmaps_jax.models import checkpoint
from propmaps_jax.results import claims_json, provenance
from propmaps_jax.results.attack_csv import attack_columns

NUM_ROWS = 10
NOT_ATTACKED = 3


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory, tiny_resnet):
    """A tiny ResNet checkpoint, a synthetic .npz data set and an attack.csv."""
    folder = tmp_path_factory.mktemp("propagation")
    module, shared = tiny_resnet
    rng = np.random.default_rng(0)

    def stats(path, x):  # BatchNorm statistics that keep about half the ReLUs open
        is_var = "var" in jax.tree_util.keystr(path)
        values = (
            rng.uniform(0.5, 1.5, x.shape)
            if is_var
            else rng.uniform(-0.3, 0.3, x.shape)
        )
        return np.asarray(values, np.float32)

    variables = {
        "params": shared["params"],
        "batch_stats": jax.tree_util.tree_map_with_path(stats, shared["batch_stats"]),
    }
    weights = str(folder / "tiny.msgpack")
    checkpoint.save_checkpoint(weights, models.ModelConfig("resnet_tiny"), variables)
    # An attack run this model could have made: images near a decision boundary,
    # for each a candidate pixel that flips the class (successful) or does not
    # (failed), and the predictions the model makes.
    probs_fn = jax.jit(
        lambda x: jax.nn.softmax(models.make_logits_fn(module, variables)(x))
    )
    pool = rng.integers(0, 256, (256, 32, 32, 3), dtype=np.uint8)
    top2 = np.sort(np.asarray(probs_fn(pool)), axis=1)[:, -2:]
    x_test = pool[np.argsort(top2[:, 1] - top2[:, 0])[:12]]
    probs = np.asarray(probs_fn(x_test))
    pred = probs.argmax(1)
    y_test = pred.astype(np.int32)
    y_test[NOT_ATTACKED] = (pred[NOT_ATTACKED] + 1) % 10
    data_path = str(folder / "data.npz")
    np.savez(
        data_path, x_train=x_test[:2], y_train=y_test[:2], x_test=x_test, y_test=y_test
    )
    rows = []
    for i in range(NUM_ROWS):
        label = int(y_test[i])
        before = [i, label, int(pred[i]), float(probs[i, label])]
        if i == NOT_ATTACKED:
            rows.append(before + [0, 0, int(pred[i]), before[3], 0, 0] + [-1] * 5)
            continue
        candidates = np.concatenate(
            [rng.integers(0, 32, (64, 2)), rng.choice([0, 255], (64, 3))], axis=1
        )
        changed = np.repeat(x_test[i : i + 1], 64, axis=0)
        changed[np.arange(64), candidates[:, 0], candidates[:, 1]] = candidates[:, 2:]
        after = np.asarray(probs_fn(changed))
        flips = np.flatnonzero(after.argmax(1) != label)
        keeps = np.flatnonzero(after.argmax(1) == label)
        want = flips if (i % 3 != 1 and flips.size) or not keeps.size else keeps
        j = int(want[0])
        pred_after = int(after[j].argmax())
        rows.append(
            before
            + [1, int(pred_after != label), pred_after, float(after[j, label]), 5, 50]
            + [int(v) for v in candidates[j]]
        )
    successes = sum(r[5] for r in rows)
    assert 2 <= successes <= NUM_ROWS - 3, successes
    workdir = folder / "work"
    workdir.mkdir()
    with open(workdir / "attack.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(attack_columns(1))
        writer.writerows(rows)
    summary = {
        "settings": {
            "weights": weights,
            "target": None,
            **provenance.describe("resnet_tiny", weights, x_test, y_test),
        },
        "dataset": data_path,
        "num_samples": NUM_ROWS,
        "attacked": NUM_ROWS - 1,
        "successes": successes,
    }
    (workdir / "attack_summary.json").write_text(json.dumps(summary))
    common = [
        "--model=resnet_tiny",
        f"--weights={weights}",
        f"--cifar10_path={data_path}",
        f"--workdir={workdir}",
    ]
    return {
        "module": module,
        "variables": variables,
        "x_test": x_test,
        "rows": np.array(rows, np.float64),
        "workdir": str(workdir),
        "args": common,
        "folder": folder,
    }


def _is_png(path):
    with open(path, "rb") as f:
        return os.path.getsize(path) > 10_000 and f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_propagation_experiment_from_attack_csv(tiny_setup):
    result = launch("--experiment=propagation", "--index=2", *tiny_setup["args"])
    assert result.returncode == 0, result.stderr[-2000:]
    out = os.path.join(tiny_setup["workdir"], "propagation")
    for reduce in ("max", "avg"):
        path = os.path.join(out, f"2_pm_{reduce}.png")
        assert _is_png(path)
        # Printed once (under absl, logging.info would repeat it on stderr).
        assert (result.stdout + result.stderr).count(f"wrote {path}") == 1
    module, variables = tiny_setup["module"], tiny_setup["variables"]
    with np.load(os.path.join(out, "2_maps.npz")) as npz:
        shapes = models.check_model(models.linen_features(module), variables)
        assert list(npz["layers"]) == list(shapes)
        pixel = tiny_setup["rows"][2, -5:].astype(np.int64)
        np.testing.assert_array_equal(npz["pixels"], pixel[None])
        expected_perturbed = tiny_setup["x_test"][2].copy()
        expected_perturbed[pixel[0], pixel[1]] = pixel[2:]
        np.testing.assert_array_equal(npz["perturbed"], expected_perturbed)
        # Reference: the maps reduced in float64 NumPy from layer_outputs.
        both = np.stack([npz["image"], npz["perturbed"]]).astype(np.float32)
        logits, fm = jax.jit(lambda x: models.layer_outputs(module, variables, x))(both)
        for name in shapes:
            fm_nat, fm_adv = np.asarray(fm[name], np.float64)
            diff = np.abs(fm_nat - fm_adv)
            for reduce, reference in (("max", diff.max(-1)), ("avg", diff.mean(-1))):
                np.testing.assert_allclose(
                    npz[f"pm_{reduce}/{name}"], reference, rtol=1e-5, atol=1e-6
                )
        np.testing.assert_allclose(
            npz["fm_max"], [float(fm[n][0].max()) for n in shapes], rtol=1e-5
        )
        np.testing.assert_allclose(npz["probs"], jax.nn.softmax(logits[0]), atol=1e-6)
        np.testing.assert_allclose(
            npz["probs_adv"], jax.nn.softmax(logits[1]), atol=1e-6
        )


def test_propagation_experiment_pixel_flags_and_move_to(tiny_setup):
    result = launch(
        "--experiment=propagation",
        "--index=5",
        "--pixel=3,4",
        "--rgb=255,0,10",
        "--move_to=20,30",
        "--signed",
        *tiny_setup["args"],
    )
    assert result.returncode == 0, result.stderr[-2000:]
    out = os.path.join(tiny_setup["workdir"], "propagation")
    assert _is_png(os.path.join(out, "5_moved_20_30_pm_max.png"))
    with np.load(os.path.join(out, "5_moved_20_30_maps.npz")) as npz:
        np.testing.assert_array_equal(npz["pixels"], [[20, 30, 255, 0, 10]])
        changed = np.argwhere(np.any(npz["perturbed"] != npz["image"], axis=-1))
        assert changed.tolist() == [[20, 30]]
        assert bool(npz["signed"])
        module, variables = tiny_setup["module"], tiny_setup["variables"]
        _, fm = jax.jit(lambda x: models.layer_outputs(module, variables, x))(
            np.stack([npz["image"], npz["perturbed"]]).astype(np.float32)
        )
        for name in ("stem", "stage3_block1/conv2"):
            fm_nat, fm_adv = np.asarray(fm[name], np.float64)
            np.testing.assert_allclose(
                npz[f"pm_max/{name}"], (fm_nat - fm_adv).max(-1), rtol=1e-5, atol=1e-6
            )
            np.testing.assert_allclose(
                npz[f"pm_avg/{name}"], (fm_nat - fm_adv).mean(-1), rtol=1e-5, atol=1e-6
            )


@pytest.mark.parametrize(
    "args, message",
    [
        (["--index=11"], "test image 11 is not in"),
        ([f"--index={NOT_ATTACKED}"], "was not attacked"),
        (["--index=1", "--pixel=3", "--rgb=1,2,3"], "--pixel='3' is not ROW,COL"),
        (["--index=1", "--pixel=40,3", "--rgb=1,2,3"], "lies outside the 32x32 image"),
    ],
)
def test_propagation_experiment_errors(tiny_setup, args, message):
    result = launch("--experiment=propagation", *tiny_setup["args"], *args)
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, last


def test_missing_attack_csv(tiny_setup):
    empty = tiny_setup["folder"] / "empty"
    args = [a for a in tiny_setup["args"] if not a.startswith("--workdir")]
    result = launch(
        "--experiment=propagation", "--index=1", f"--workdir={empty}", *args
    )
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert "attack.csv does not exist: run the attack first" in last, last


def test_statistics_experiment_equals_direct_computation(tiny_setup):
    result = launch("--experiment=statistics", "--batch_size=4", *tiny_setup["args"])
    assert result.returncode == 0, result.stderr[-2000:]
    out = os.path.join(tiny_setup["workdir"], "statistics")
    for name in (
        "mean_pm_avg_successful",
        "mean_pm_avg_failed",
        "layer_means",
        "distance_from_centre",
    ):
        assert _is_png(os.path.join(out, f"{name}.png")), name

    # Direct, non-streaming: all attacked images in one batch.
    rows = tiny_setup["rows"]
    attacked = rows[:, 4] == 1
    success = rows[attacked, 5] == 1
    pixels = rows[attacked, -5:].astype(np.int64)[:, None, :]
    images = tiny_setup["x_test"][rows[attacked, 0].astype(np.int64)]
    perturbed = np.asarray(apply_pixels_batch(jnp.asarray(images), jnp.asarray(pixels)))
    module, variables = tiny_setup["module"], tiny_setup["variables"]
    model = models.linen_features(module)
    analyze = jax.jit(lambda x, x_adv: propagation.analyze(model, variables, x, x_adv))
    direct = jax.device_get(analyze(images, perturbed))
    shapes = models.check_model(model, variables)

    with open(os.path.join(out, "per_layer.csv")) as f:
        table = list(csv.DictReader(f))
    assert [r["layer"] for r in table[::3]] == list(shapes)
    masks = {"successful": success, "failed": ~success, "all": np.ones_like(success)}
    for row in table:
        mask = masks[row["outcome"]]
        assert int(row["attacks"]) == mask.sum()
        s = {
            k: np.asarray(v, np.float64)[mask]
            for k, v in direct["summaries"][row["layer"]].items()
        }
        expected = {
            "max_ratio_mean": s["max_ratio"].mean(),
            "max_ratio_p95": np.percentile(s["max_ratio"], 95),
            "reaches_max_fraction": np.mean(s["max_ratio"] >= 1),
            "spread_mean": s["spread"].mean(),
            "spread_p95": np.percentile(s["spread"], 95),
            "mean_abs_diff": s["mean_abs_diff"].mean(),
            "mean_fm": s["mean_fm"].mean(),
            "mean_abs_fm": s["mean_abs_fm"].mean(),
        }
        for key, value in expected.items():
            np.testing.assert_allclose(
                float(row[key]), value, rtol=2e-4, atol=1e-6, err_msg=key
            )

    with np.load(os.path.join(out, "mean_maps.npz")) as npz:
        for name in shapes:
            pm_avg = np.asarray(direct["pm_avg"][name], np.float64)
            np.testing.assert_allclose(
                npz[f"pm_avg/successful/{name}"],
                pm_avg[success].mean(0),
                rtol=1e-5,
                atol=1e-7,
            )
            np.testing.assert_allclose(
                npz[f"pm_avg/failed/{name}"],
                pm_avg[~success].mean(0),
                rtol=1e-5,
                atol=1e-7,
            )

    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    assert summary["attacks"] == attacked.sum() and summary["not_attacked"] == 1
    assert summary["successful"] == success.sum()
    # Chebyshev distance from the centre (15.5, 15.5): one bin per square ring.
    distances = np.maximum(
        np.abs(pixels[:, 0, 0] - 15.5), np.abs(pixels[:, 0, 1] - 15.5)
    )
    stats = summary["distance_from_centre"]
    assert stats["metric"].startswith("Chebyshev distance (max(|dr|, |dc|))")
    assert stats["all"]["histogram_edges"] == list(range(17))
    # Ring k (k = 0..15) holds (2k + 2)^2 - (2k)^2 = 8k + 4 of the 1024 positions.
    np.testing.assert_allclose(
        stats["uniform_histogram_fractions"], (8 * np.arange(16) + 4) / 1024
    )
    for outcome in ("successful", "failed"):
        d = distances[masks[outcome]]
        stats = summary["distance_from_centre"][outcome]
        np.testing.assert_allclose(stats["mean"], d.mean())
        np.testing.assert_allclose(stats["median"], np.median(d))
        np.testing.assert_allclose(stats["q1"], np.percentile(d, 25))
        assert sum(stats["histogram_counts"]) == d.size
    # The run's pred_after are the model's own predictions.
    predicted = np.argmax(direct["logits_adv"], axis=-1)
    np.testing.assert_array_equal(predicted, rows[attacked, 6])
    assert summary["pred_after_mismatches"] == 0

    # claims.json: each sentence's primary statistic, from the same per-image values.
    with open(os.path.join(out, "claims.json")) as f:
        report = json.load(f)
    assert report["schema"] == 2
    found = report["claims"]
    assert list(found) == [c.key for c in claims.CLAIMS]
    last = list(shapes)[-1]

    def per_layer(name):
        return np.stack(
            [np.asarray(direct["summaries"][n][name], np.float64) for n in shapes], 1
        )

    ratio = per_layer("max_ratio")
    close = found["close_to_max"]
    assert close["primary"]["layer"] == last
    assert close["primary"]["successes"] == np.sum(ratio[success, -1] >= 0.9)
    assert close["secondary"]["failed_last_layer"]["successes"] == np.sum(
        ratio[~success, -1] >= 0.9
    )
    for outcome in ("successful", "failed"):
        for t in ("0.5", "0.9"):
            shares = close["secondary"]["per_layer"][outcome][t]
            got = [s["successes"] for s in shares]
            expected = np.sum(ratio[masks[outcome]] >= float(t), axis=0)
            assert got == list(expected), (outcome, t)
    # Figure 3's reading: the peak of PM_avg over the layer's max FM.
    peak = np.stack(
        [np.asarray(direct["pm_avg"][n], np.float64).max(axis=(1, 2)) for n in shapes],
        1,
    ) / per_layer("fm_max")
    same = found["same_across_layers"]["primary"]
    np.testing.assert_allclose(
        [p["mean"] for p in same["per_layer"]], peak[success].mean(0), rtol=1e-4
    )
    square = (np.abs(pixels[:, 0, :2] - 15.5) < 8).all(axis=1)
    farther = found["failed_farther_from_centre"]
    assert farther["primary"]["successful"]["successes"] == square[success].sum()
    assert farther["primary"]["failed"]["successes"] == square[~success].sum()
    assert (
        "does not record seed" in (farther["secondary"]["generation0"]["not_computed"])
    )
    strong = per_layer("spread_strong")[:, -1]
    quarter = found["quarter_of_last_map"]
    assert quarter["primary"]["successes"] == np.sum(strong[success] > 0.25)
    assert quarter["secondary"]["failed"]["successes"] == np.sum(
        strong[~success] > 0.25
    )
    centre = found["centre_concentration"]
    with np.load(os.path.join(out, "mean_maps.npz")) as npz:
        mass = claims.centre_mass(npz[f"pm_avg/successful/{last}"])
    shares = centre["secondary"]["successful"]["central_mass_share"]
    assert shares["attacks"] == pytest.approx(mass)
    assert centre["primary"]["excess"] == pytest.approx(
        mass - shares["distance_matched"]
    )
    assert 0 <= shares["uniform_positions"] <= 1
    assert centre["verdict"] == claims.matched_concentration_verdict(
        centre["primary"]["excess"]
    )
    diff = per_layer("mean_abs_diff")
    figure9 = found["figure9_similar"]
    np.testing.assert_allclose(
        [r["ratio"] for r in figure9["primary"]["failed_over_successful"]],
        diff[~success].mean(0) / diff[success].mean(0),
        rtol=1e-5,
    )
    own = diff / per_layer("mean_abs_fm")
    np.testing.assert_allclose(
        [
            r["ratio"]
            for r in figure9["secondary"]["divided_by_own_mean_abs_fm"][
                "failed_over_successful"
            ]
        ],
        own[~success].mean(0) / own[success].mean(0),
        rtol=1e-5,
    )
    for entry in found.values():
        assert entry["primary_statistic"] and entry["why"] and entry["verdict"]
    provenance_ = report["provenance"]
    assert provenance_["status"] in ("prospective", "retrospective", "unknown")
    assert provenance_["numbers_first_seen"]
    assert _is_png(os.path.join(out, "mean_pm_avg_uniform_positions.png"))
    with open(os.path.join(out, "claims.md")) as f:
        text = f.read()
    assert f"Rules: {provenance_['status']}" in text
    for key in found:
        assert f"### {key}" in text and f"| {key} |" in text
    # The statistics folder reads back through the claims file's reader.
    assert claims_json.claim(out, "close_to_max") == found["close_to_max"]


def test_paper_figures_are_chosen_by_the_rules(tiny_setup):
    result = launch("--experiment=propagation", "--paper_figures", *tiny_setup["args"])
    assert result.returncode == 0, result.stderr[-2000:]
    out = os.path.join(tiny_setup["workdir"], "paper_figures")
    with open(os.path.join(out, "figures.json")) as f:
        figures = {r["figure"]: r for r in json.load(f)["figures"]}
    assert set(figures) == {"2 and 3", "4", "5", "6"}
    rows = tiny_setup["rows"]
    attacked, success = rows[:, 4] == 1, rows[:, 5] == 1
    ok = np.flatnonzero(attacked & success)
    order = ok[np.argsort(rows[ok, 3], kind="stable")]
    assert figures["2 and 3"]["index"] == int(rows[order[(ok.size - 1) // 2], 0])
    assert figures["4"]["index"] == figures["2 and 3"]["index"]
    assert figures["4"]["pixels"] != figures["2 and 3"]["pixels"]
    # Figure 5: the failed attack with the largest last-layer ratio, directly.
    failed = np.flatnonzero(attacked & ~success)
    pixels = rows[failed, -5:].astype(np.int64)[:, None, :]
    images = tiny_setup["x_test"][rows[failed, 0].astype(np.int64)]
    perturbed = apply_pixels_batch(jnp.asarray(images), jnp.asarray(pixels))
    module, variables = tiny_setup["module"], tiny_setup["variables"]
    direct = propagation.analyze(
        models.linen_features(module), variables, images, perturbed
    )
    last = list(direct["summaries"])[-1]
    ratio = np.asarray(direct["summaries"][last]["max_ratio"])
    assert figures["5"]["index"] == int(rows[failed[np.nanargmax(ratio)], 0])
    for record in figures.values():
        for name in record["files"]:
            assert _is_png(os.path.join(out, name)), name
        assert 0 <= record["confidence_before"] <= 1


def _copy_run(tiny_setup, name):
    workdir = tiny_setup["folder"] / name
    workdir.mkdir()
    for file in ("attack.csv", "attack_summary.json"):
        (workdir / file).write_text((tiny_setup["folder"] / "work" / file).read_text())
    args = [a for a in tiny_setup["args"] if not a.startswith("--workdir")]
    return workdir, [*args, f"--workdir={workdir}"]


@pytest.mark.parametrize(
    "experiment, change, message",
    [
        # Issue 13: another model on the run gave mislabelled results, exit 0.
        (
            "propagation",
            "--model=lenet_tiny",
            "was made with model 'resnet_tiny', not 'lenet_tiny'; pass "
            "--model=resnet_tiny and --weights=",
        ),
        (
            "statistics",
            "--model=lenet_tiny",
            "was made with model 'resnet_tiny', not 'lenet_tiny'; pass "
            "--model=resnet_tiny and --weights=",
        ),
        # Issue 13: a duplicated row was counted twice by statistics.
        ("statistics", "duplicate", "line 12: test image 9 appears again"),
    ],
)
def test_a_run_that_does_not_belong_is_refused(tiny_setup, experiment, change, message):
    workdir, args = _copy_run(tiny_setup, f"refused_{experiment}_{change[2:7]}")
    if change == "duplicate":
        lines = (workdir / "attack.csv").read_text().splitlines()
        (workdir / "attack.csv").write_text("\n".join(lines + lines[-1:]) + "\n")
    else:
        args = [a for a in args if not a.startswith("--model")] + [change]
    if experiment == "propagation":
        args.append("--index=2")
    result = launch(f"--experiment={experiment}", *args)
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, last
    assert str(workdir / "attack.csv") in last or "attack run in" in last, last
    assert "Traceback" not in result.stderr
    assert sorted(os.listdir(workdir)) == ["attack.csv", "attack_summary.json"]


@pytest.mark.parametrize("experiment", ["propagation", "statistics"])
def test_a_mistyped_workdir_is_an_error_and_is_not_created(tiny_setup, experiment):
    missing = os.path.join(tiny_setup["folder"], f"no_such_run_{experiment}")
    args = [a for a in tiny_setup["args"] if not a.startswith("--workdir=")]
    index = ["--index=2"] if experiment == "propagation" else []
    result = launch(f"--experiment={experiment}", *index, *args, f"--workdir={missing}")
    assert result.returncode == 2, result.stderr
    assert "attack.csv" in result.stderr and "Traceback" not in result.stderr
    assert not os.path.exists(missing)
