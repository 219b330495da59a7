"""--data_split: every experiment attacks or evaluates the split it names (through
common.load_data); an .npz of x, y alone (training images only) needs train."""

import json

import numpy as np
import pytest
from conftest import launch as launch_py

import launch
from propmaps_jax import data, models
from propmaps_jax.results import provenance
from tests._fixtures import save_lenet_tiny


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A lenet_tiny checkpoint, an .npz of x, y alone (12 images) and an .npz of
    both splits whose training split is those 12 images (and 5 test images)."""
    folder = tmp_path_factory.mktemp("data_split")
    weights = str(folder / "lenet_tiny.msgpack")
    module, variables = save_lenet_tiny(weights, 3)
    rng = np.random.default_rng(8)
    x = rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)
    y = np.arange(12, dtype=np.int64) % 10
    train_only = str(folder / "train_only.npz")
    np.savez(train_only, x=x, y=y)
    both = str(folder / "both.npz")
    np.savez(both, x_train=x, y_train=y, x_test=x[:5], y_test=y[:5])
    predicted = np.asarray(models.make_logits_fn(module, variables)(x)).argmax(1)
    return folder, weights, train_only, both, int((predicted == y).sum())


def _evaluate(tiny, path: str, workdir: str, *extra: str):
    folder, weights = tiny[:2]
    return launch_py(
        "--experiment=evaluate",
        "--model=lenet_tiny",
        f"--weights={weights}",
        f"--cifar10_path={path}",
        f"--workdir={folder / workdir}",
        "--batch_size=6",
        *extra,
    )


def test_evaluate_honours_data_split(tiny):
    folder, _, train_only, both, correct = tiny
    for path, workdir in ((train_only, "lossless"), (both, "both")):
        result = _evaluate(tiny, path, workdir, "--data_split=train")
        assert result.returncode == 0, result.stderr[-2000:]
        report = json.loads((folder / workdir / "evaluation.json").read_text())
        assert report["total"] == 12 and report["correct"] == correct
        assert report["data"] == f"{path} [train split]"
    # The default is the test split.
    result = _evaluate(tiny, both, "default")
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((folder / "default" / "evaluation.json").read_text())
    assert report["total"] == 5 and report["data"] == both


def test_training_images_only_need_data_split_train(tiny):
    result = _evaluate(tiny, tiny[2], "refused")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"error: {tiny[2]} has an empty test split: it holds training images only "
        "(e.g. an .npz of x, y); pass --data_split=train"
    )
    assert not (tiny[0] / "refused" / "evaluation.json").exists()


def test_every_experiment_takes_data_split_and_refuses_other_values():
    for name in launch.EXPERIMENTS:
        # train always trains on train and tests on test; readings reads no data
        takes = name not in ("train", "readings")
        assert ("data_split" in launch.flags_read(name)) == takes, name
    assert launch.check(["--experiment=attack", "--data_split=train"]) == "attack"
    with pytest.raises(launch.UsageError, match=r"--data_split=val: value should"):
        launch.check(["--experiment=locality", "--data_split=val"])


def test_the_attacked_split_is_recorded_by_content(tiny):
    """What an attack run's settings hold (provenance.describe of the test slot)
    differs between the splits, and between two copies of the same images."""
    _, _, train_only, both, _ = tiny
    lossless = data.attack_split(data.load_from_path(train_only), "train")
    two_splits = data.load_from_path(both)

    def dataset_sha256(dataset):
        return provenance.dataset_sha256(*dataset.split("test"))

    # The same 12 images from either file: the same run.
    assert dataset_sha256(lossless) == dataset_sha256(
        data.attack_split(two_splits, "train")
    )
    assert dataset_sha256(two_splits) != dataset_sha256(lossless)
    x, y = lossless.split("test")
    smoothed = x.copy()
    smoothed[0, 0, 0, 0] ^= 1  # another encoding of the same images
    assert provenance.dataset_sha256(smoothed, y) != dataset_sha256(lossless)
