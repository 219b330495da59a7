"""End to end: a pixel-permuted tiny model through the locality experiment (network-
space moves, the within-image analysis), then the readings experiment on its run."""

import json
import os

import jax
import numpy as np
import pytest
from conftest import launch

from propmaps_jax import models
from propmaps_jax.models import checkpoint
from propmaps_jax.results import locality_csv

NUM_SAMPLES = 16


@pytest.fixture(scope="module")
def perm_run(tmp_path_factory):
    """A lenet_perm_tiny checkpoint, a tiny .npz it barely gets right, and its run."""
    folder = tmp_path_factory.mktemp("readings")
    config = models.default_config("lenet_perm_tiny")
    module = models.create_model(config)
    variables = models.init_variables(module, jax.random.key(5))
    weights = str(folder / "perm.msgpack")
    checkpoint.save_checkpoint(weights, config, variables)
    rng = np.random.default_rng(1)
    pool = rng.integers(0, 256, (512, 32, 32, 3), dtype=np.uint8)
    logits = np.asarray(models.make_logits_fn(module, variables)(pool))
    top2 = np.sort(logits, axis=1)[:, -2:]
    chosen = np.argsort(top2[:, 1] - top2[:, 0])[:NUM_SAMPLES]
    x, y = pool[chosen], logits[chosen].argmax(axis=1).astype(np.int64)
    data = str(folder / "tiny.npz")
    np.savez(data, x_train=x, y_train=y, x_test=x, y_test=y)
    workdir = str(folder / "run")
    proc = launch(
        "--experiment=locality",
        "--models=lenet_perm_tiny",
        f"--weights_lenet_perm_tiny={weights}",
        f"--cifar10_path={data}",
        f"--num_samples={NUM_SAMPLES}",
        "--population=100",  # 3 successes (200: 2)
        "--generations=4",
        "--vulnerability_maps=0",  # no test here reads them
        "--max_distance=2",
        "--batch_size=512",
        f"--workdir={workdir}",
        env={"CIFAR10_PATH": None},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"folder": folder, "workdir": workdir, "weights": weights, "data": data}


def test_permuted_run_writes_network_moves(perm_run):
    model_dir = os.path.join(perm_run["workdir"], "lenet_perm_tiny")
    moved = locality_csv.read(
        os.path.join(model_dir, "locality.csv"), max_distance=2, network=True
    )
    assert len(moved["index"]) > 0
    perm = models.default_config("lenet_perm_tiny").permutation
    inverse = models.inverse_permutation(perm)
    # Each network-space nearby position is a neighbour in the network's input.
    q = inverse[moved["row"] * 32 + moved["col"]]
    qn = inverse[moved["netnearby_row"] * 32 + moved["netnearby_col"]]
    distance = np.maximum(np.abs(q // 32 - qn // 32), np.abs(q % 32 - qn % 32))
    assert np.all(distance == 1)
    table = open(os.path.join(perm_run["workdir"], "table1.md")).read()
    assert "on nearby pixels in the network's coordinates" in table
    assert "distance (network space)" in table
    record = json.load(open(os.path.join(model_dir, "within_image.json")))
    assert set(record["spaces"]) == {"image", "network"}
    assert "network_nearby - nearby" in record["moves"]["differences"]
    assert "Within images" in table


def test_readings_on_the_run(perm_run, tmp_path):
    model_dir = os.path.join(perm_run["workdir"], "lenet_perm_tiny")
    out = str(tmp_path / "readings")
    proc = launch(
        "--experiment=readings",
        f"--runs=lenet_perm={model_dir},mlp={model_dir}",
        f"--workdir={out}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.load(open(os.path.join(out, "readings.json")))
    assert {"perm_network_vs_image", "perm_image_vs_random"} <= set(
        record["measured"]
    ) or record["decision"]["counts"]["not measured"] >= 4
    assert record["decision"]["verdict"] in (
        "receptive field",
        "image content",
        "both",
        "neither",
    )
    text = open(os.path.join(out, "readings.md")).read()
    assert "**Verdict:" in text
    assert os.path.getsize(os.path.join(out, "readings_distance.png")) > 10_000


def test_readings_refuses_a_run_without_its_files(tmp_path):
    proc = launch(
        "--experiment=readings", f"--runs=mlp={tmp_path}", f"--workdir={tmp_path}/o"
    )
    assert proc.returncode != 0
    assert "run the locality experiment" in proc.stderr.strip().splitlines()[-1]


def test_readings_refuses_network_moves_of_a_model_without_permutation(
    perm_run, tmp_path
):
    # The same run read as a model without network moves: drop the columns.
    model_dir = os.path.join(perm_run["workdir"], "lenet_perm_tiny")
    copy = tmp_path / "plain"
    copy.mkdir()
    lines = open(os.path.join(model_dir, "locality.csv")).read().splitlines()
    keep = [i for i, c in enumerate(lines[0].split(",")) if not c.startswith("net")]
    (copy / "locality.csv").write_text(
        "\n".join(",".join(line.split(",")[i] for i in keep) for line in lines) + "\n"
    )
    rows = np.load(os.path.join(model_dir, "within_image_rows.npz"))
    np.savez(
        copy / "within_image_rows.npz",
        **{k: rows[k] for k in rows.files if not k.startswith("network_")},
    )
    proc = launch(
        "--experiment=readings",
        f"--runs=lenet_perm={copy}",
        f"--workdir={tmp_path}/o",
    )
    assert proc.returncode != 0
    assert "no network-space moves" in proc.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("runs", ["", "lenet_perm", "a=x,a=y"])
def test_readings_refuses_bad_runs_flag(runs, tmp_path):
    proc = launch("--experiment=readings", f"--runs={runs}", f"--workdir={tmp_path}")
    assert proc.returncode != 0
    assert "--runs" in proc.stderr.strip().splitlines()[-1]
