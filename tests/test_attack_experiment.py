"""experiments/attack.py: attack.csv, summary, resume, settings clashes, flags."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from experiments import attack as attack_experiment
from experiments import results
from propmaps_jax import checkpoint, data, models
from propmaps_jax.attack import AttackConfig
from propmaps_jax.errors import PropmapsError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = AttackConfig(pixels=1, population=8, generations=3)
NUM_SAMPLES = 10
MISLABELED = (1, 6, 7)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny LeNet checkpoint and a fake CIFAR-10 whose test labels are the model's
    predictions except for three mislabeled (misclassified) images."""
    folder = tmp_path_factory.mktemp("attack_experiment")
    module = models.create_model("lenet_tiny")
    variables = models.init_variables(module, jax.random.key(2))
    weights = str(folder / "lenet_tiny.msgpack")
    checkpoint.save_checkpoint(weights, models.ModelConfig("lenet_tiny"), variables)
    rng = np.random.default_rng(1)
    x_test = rng.integers(0, 256, size=(12, 32, 32, 3), dtype=np.uint8)
    logits = np.asarray(models.make_logits_fn(module, variables)(x_test))
    y_test = logits.argmax(-1).astype(np.int32)
    for i in MISLABELED:
        y_test[i] = (y_test[i] + 1) % 10
    dataset = data.Cifar10(x_test[:0], y_test[:0], x_test, y_test, source="fake")
    kwargs = dict(
        model_name="lenet_tiny",
        weights=weights,
        dataset=dataset,
        num_samples=NUM_SAMPLES,
        seed=0,
        sample="first",
        config=CONFIG,
        slots=3,
        chunk_size=4,
    )
    return folder, kwargs, (module, variables, x_test, y_test)


@pytest.fixture(scope="module")
def finished(setup):
    folder, kwargs, _ = setup
    workdir = str(folder / "uninterrupted")
    summary = attack_experiment.run_attack(workdir, **kwargs)
    return workdir, summary


def assert_candidates_reproduce(table, rows, module, variables, x_test, y_test):
    """The float32 model on each selected row's candidate gives its prediction,
    success and p(true)."""
    logits_fn = jax.jit(models.make_logits_fn(module, variables))
    for i in np.flatnonzero(rows):
        image = x_test[i].copy()
        row, col, r, g, b = table["pixels"][i, 0]
        image[row, col] = (r, g, b)
        probs = np.asarray(jax.nn.softmax(logits_fn(image[None])[0]))
        assert probs.argmax() == table["pred_after"][i]
        assert (probs.argmax() != y_test[i]) == table["success"][i]
        np.testing.assert_allclose(probs[y_test[i]], table["prob_true_after"][i], 1e-5)


def test_attack_csv_and_summary(setup, finished):
    _, _, (module, variables, x_test, y_test) = setup
    workdir, summary = finished
    with open(os.path.join(workdir, "attack.csv")) as f:
        assert f.readline().strip() == ",".join(results.attack_columns(1))
    table = results.read_attack_csv(os.path.join(workdir, "attack.csv"))
    np.testing.assert_array_equal(table["index"], np.arange(NUM_SAMPLES))
    np.testing.assert_array_equal(table["label"], y_test[:NUM_SAMPLES])
    misclassified = np.isin(np.arange(NUM_SAMPLES), MISLABELED)
    np.testing.assert_array_equal(table["attacked"], ~misclassified)
    assert not table["success"][misclassified].any()
    assert (table["pixels"][misclassified] == -1).all()
    assert (table["evaluations"][misclassified] == 0).all()
    # Every attacked row's candidate reproduces its prediction and p(true).
    assert_candidates_reproduce(
        table, ~misclassified, module, variables, x_test, y_test
    )
    for i in np.flatnonzero(~misclassified):
        expected_evaluations = CONFIG.population * (table["generations"][i] + 1)
        assert table["evaluations"][i] == expected_evaluations
    assert summary["num_samples"] == NUM_SAMPLES
    assert summary["attacked"] == NUM_SAMPLES - len(MISLABELED)
    assert summary["accuracy_before"] == pytest.approx(0.7)
    assert summary["successes"] == int(table["success"].sum()) > 0
    assert summary["success_rate_attacked"] == pytest.approx(summary["successes"] / 7)
    assert summary["success_rate_all"] == pytest.approx(summary["successes"] / 10)
    assert summary["settings"]["population"] == 8
    assert "device_kind" in summary["device"]
    assert not os.path.exists(os.path.join(workdir, ".attack_chunks"))


def test_finished_run_is_not_recomputed(setup, finished, monkeypatch):
    _, kwargs, _ = setup
    workdir, summary = finished

    def fail(*args, **kwargs):
        raise AssertionError("attack_stream called for a finished run")

    monkeypatch.setattr(attack_experiment, "attack_stream", fail)
    assert attack_experiment.run_attack(workdir, **kwargs) == summary


def test_other_settings_are_refused(setup, finished):
    _, kwargs, _ = setup
    workdir, _ = finished
    before = {
        name: open(os.path.join(workdir, name)).read()
        for name in ("attack.csv", "attack_summary.json")
    }
    other = dict(kwargs, config=AttackConfig(population=9, generations=3))
    with pytest.raises(PropmapsError, match=r"other settings \(population: 8 -> 9\)"):
        attack_experiment.run_attack(workdir, **other)
    for name, text in before.items():
        assert open(os.path.join(workdir, name)).read() == text


def test_interrupted_run_resumes_to_the_same_files(setup, finished, monkeypatch):
    folder, kwargs, _ = setup
    workdir, summary = finished
    resumed = str(folder / "interrupted")
    save_chunk = attack_experiment._save_chunk
    calls = []

    def save_then_die(*args):
        save_chunk(*args)
        calls.append(args[1:3])
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed after two of three chunks

    monkeypatch.setattr(attack_experiment, "_save_chunk", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        attack_experiment.run_attack(resumed, **kwargs)
    assert calls == [(0, 4), (4, 8)]
    assert not os.path.exists(os.path.join(resumed, "attack.csv"))
    # Resume with another chunk size: only [8, 10) is attacked.
    resumed_summary = attack_experiment.run_attack(
        resumed, **dict(kwargs, chunk_size=1)
    )
    assert calls[2:] == [(8, 9), (9, 10)]
    with (
        open(os.path.join(workdir, "attack.csv")) as a,
        open(os.path.join(resumed, "attack.csv")) as b,
    ):
        assert a.read() == b.read()
    with open(os.path.join(resumed, "attack_summary.json")) as f:
        assert json.load(f) == resumed_summary
    for name in attack_experiment.RUN_SPECIFIC:
        summary.pop(name), resumed_summary.pop(name)
    assert resumed_summary == summary


def test_sample_indices():
    np.testing.assert_array_equal(
        attack_experiment.sample_indices(100, 5, 0, "first"), np.arange(5)
    )
    drawn = attack_experiment.sample_indices(100, 20, 3, "random")
    assert len(set(drawn)) == 20 and (np.diff(drawn) > 0).all() and drawn.max() < 100
    np.testing.assert_array_equal(
        drawn, attack_experiment.sample_indices(100, 20, 3, "random")
    )
    assert not np.array_equal(
        drawn, attack_experiment.sample_indices(100, 20, 4, "random")
    )
    with pytest.raises(PropmapsError, match="exceeds the 100 test images"):
        attack_experiment.sample_indices(100, 101, 0, "first")


def test_parse_target():
    assert attack_experiment.parse_target("none") is None
    assert attack_experiment.parse_target("all") == "all"
    assert attack_experiment.parse_target("3") == 3
    with pytest.raises(PropmapsError, match="class in 0..9"):
        attack_experiment.parse_target("10")
    with pytest.raises(PropmapsError, match="none, all or a class"):
        attack_experiment.parse_target("cat")


def test_bad_flag_gives_a_one_line_error(tmp_path):
    command = [
        sys.executable,
        "launch.py",
        "--experiment=attack",
        f"--workdir={tmp_path}",
        "--population=3",
    ]
    done = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2, done.stderr
    assert "error: population must be an integer >= 4" in done.stderr
    assert "Traceback" not in done.stderr


def test_bfloat16_search_reports_float32_results(setup):
    """--search_dtype=bfloat16: the search's model runs in bfloat16, every reported
    number is the float32 model's, and the run's settings and summary say so."""
    folder, kwargs, (module, variables, x_test, y_test) = setup
    workdir = str(folder / "bfloat16")
    summary = attack_experiment.run_attack(workdir, **kwargs, search_dtype="bfloat16")
    assert summary["settings"]["search_dtype"] == "bfloat16"
    assert summary["search_dtype"] == "bfloat16" and summary["search_rejections"] >= 0
    table = results.read_attack_csv(os.path.join(workdir, "attack.csv"))
    assert_candidates_reproduce(
        table, table["attacked"], module, variables, x_test, y_test
    )
    # A float32 run keeps its settings as before (no search_dtype entry).
    assert "search_dtype" not in attack_experiment._settings(
        "m", None, 1, 0, "first", CONFIG, None
    )
