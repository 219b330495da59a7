"""End-to-end tiny runs of the propagation and statistics experiments (subprocesses).

The experiment modules define absl flags (--model, --weights) that other experiment
modules define too, so they are run through launch.py, never imported here.
"""

import csv
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.results import attack_columns
from propmaps_jax import checkpoint, models, propagation
from propmaps_jax.perturb import apply_pixels_batch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_ROWS = 10
NOT_ATTACKED = 3


def run_launch(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, "launch.py", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


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
    x_test = rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)
    y_test = rng.integers(0, 10, 12).astype(np.int32)
    data_path = str(folder / "data.npz")
    np.savez(
        data_path, x_train=x_test[:2], y_train=y_test[:2], x_test=x_test, y_test=y_test
    )
    rows = []
    for i in range(NUM_ROWS):
        attacked = i != NOT_ATTACKED
        pixel = (
            [
                int(rng.integers(32)),
                int(rng.integers(32)),
                *map(int, rng.integers(0, 256, 3)),
            ]
            if attacked
            else [-1] * 5
        )
        success = attacked and i % 3 != 1
        rows.append(
            [
                i,
                y_test[i],
                y_test[i],
                0.5,
                int(attacked),
                int(success),
                0,
                0.1,
                5,
                50,
                *pixel,
            ]
        )
    workdir = folder / "work"
    workdir.mkdir()
    with open(workdir / "attack.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(attack_columns(1))
        writer.writerows(rows)
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
    result = run_launch("--experiment=propagation", "--index=2", *tiny_setup["args"])
    assert result.returncode == 0, result.stderr[-2000:]
    out = os.path.join(tiny_setup["workdir"], "propagation")
    for reduce in ("max", "avg"):
        path = os.path.join(out, f"2_pm_{reduce}.png")
        assert _is_png(path)
        # Printed once (under absl, logging.info would repeat it on stderr).
        assert (result.stdout + result.stderr).count(f"wrote {path}") == 1
    module, variables = tiny_setup["module"], tiny_setup["variables"]
    with np.load(os.path.join(out, "2_maps.npz")) as npz:
        shapes = propagation.layer_shapes(module, variables)
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
    result = run_launch(
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
    result = run_launch("--experiment=propagation", *tiny_setup["args"], *args)
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, last


def test_missing_attack_csv(tiny_setup):
    empty = tiny_setup["folder"] / "empty"
    args = [a for a in tiny_setup["args"] if not a.startswith("--workdir")]
    result = run_launch(
        "--experiment=propagation", "--index=1", f"--workdir={empty}", *args
    )
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert "attack.csv does not exist: run the attack first" in last, last


def test_statistics_experiment_equals_direct_computation(tiny_setup):
    result = run_launch(
        "--experiment=statistics", "--batch_size=4", *tiny_setup["args"]
    )
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
    analyze = jax.jit(lambda x, x_adv: propagation.analyze(module, variables, x, x_adv))
    direct = jax.device_get(analyze(images, perturbed))
    shapes = propagation.layer_shapes(module, variables)

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
    distances = np.hypot(pixels[:, 0, 0] - 15.5, pixels[:, 0, 1] - 15.5)
    for outcome in ("successful", "failed"):
        d = distances[masks[outcome]]
        stats = summary["distance_from_centre"][outcome]
        np.testing.assert_allclose(stats["mean"], d.mean())
        np.testing.assert_allclose(stats["median"], np.median(d))
        np.testing.assert_allclose(stats["q1"], np.percentile(d, 25))
        assert sum(stats["histogram_counts"]) == d.size
    # pred_after in our hand-written csv is 0 for every row.
    predicted = np.argmax(direct["logits_adv"], axis=-1)
    assert summary["pred_after_mismatches"] == int(np.sum(predicted != 0))
