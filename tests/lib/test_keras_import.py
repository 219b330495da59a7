"""Keras import: parity with a float64 NumPy Keras graph, accuracy, errors."""

import os
import shutil

import h5py
import jax
import numpy as np
import pytest

from propmaps_jax import data, evaluation, models
from propmaps_jax.errors import WeightsError
from propmaps_jax.models import checkpoint, keras_import
from tests.keras_reference import KerasReference


@pytest.fixture(scope="module")
def imported(keras_weights_dir):
    """{name: (module, variables, metadata, path)} for lenet.h5 and resnet.h5."""
    out = {}
    for name in ("lenet", "resnet"):
        path = os.path.join(keras_weights_dir, f"{name}.h5")
        config, variables, metadata = keras_import.load_keras_weights(path, name)
        out[name] = (models.create_model(config), variables, metadata, path)
    return out


@pytest.fixture(scope="module")
def test_split(cifar10_path):
    return data.load_cifar10(cifar10_path).split("test")


def _parity_images(rng: np.random.Generator) -> np.ndarray:
    """Random uint8 and float images plus the extremes (all 0, all 255)."""
    return np.concatenate(
        [
            rng.integers(0, 256, (3, 32, 32, 3)).astype(np.float32),
            rng.uniform(0, 255, (2, 32, 32, 3)).astype(np.float32),
            np.zeros((1, 32, 32, 3), np.float32),
            np.full((1, 32, 32, 3), 255.0, np.float32),
        ]
    )


def _max_softmax_error(entry, images) -> float:
    module, variables, _, path = entry
    ours = np.asarray(jax.nn.softmax(models.make_logits_fn(module, variables)(images)))
    reference = KerasReference(path)(images)
    np.testing.assert_allclose(reference.sum(axis=1), 1.0, atol=1e-12)
    assert (ours.argmax(axis=1) == reference.argmax(axis=1)).all()
    return float(np.abs(ours - reference).max())


@pytest.mark.parametrize("name", ["lenet", "resnet"])
def test_softmax_matches_float64_keras_graph_on_random_images(imported, name):
    error = _max_softmax_error(imported[name], _parity_images(np.random.default_rng(0)))
    assert error < 1e-5, f"{name}: max |softmax - keras| = {error:.2e}"


@pytest.mark.parametrize("name", ["lenet", "resnet"])
def test_softmax_matches_float64_keras_graph_on_real_images(imported, test_split, name):
    images = test_split[0][:6].astype(np.float32)
    error = _max_softmax_error(imported[name], images)
    assert error < 1e-5, f"{name}: max |softmax - keras| = {error:.2e}"


def test_reference_conv_same_padding_matches_hand_computed_case():
    # 1 channel 4x4 ramp, 3x3 ones kernel, stride 2, 'same': TF pads 0 before and
    # 1 after in each dimension, so outputs are sums of windows starting at 0 and 2.
    x = np.arange(16, dtype=np.float64).reshape(1, 4, 4, 1)
    from tests.keras_reference import conv2d

    y = conv2d(x, np.ones((3, 3, 1, 1)), np.zeros(1), (2, 2), "same")
    expected = [
        [x[0, 0:3, 0:3].sum(), x[0, 0:3, 2:4].sum()],
        [x[0, 2:4, 0:3].sum(), x[0, 2:4, 2:4].sum()],
    ]
    np.testing.assert_array_equal(y[0, :, :, 0], expected)


def test_import_maps_layers_in_keras_graph_order(imported):
    lenet_map = imported["lenet"][2]["layer_map"]
    assert lenet_map == {
        "conv1": "conv2d_1",
        "conv2": "conv2d_2",
        "fc1": "dense_1",
        "fc2": "dense_2",
        "logits": "dense_3",
    }
    resnet_map = imported["resnet"][2]["layer_map"]
    convs = [k for k, v in resnet_map.items() if v.startswith("conv2d_")]
    assert len(convs) == 33
    # Keras numbers convolutions in creation order: conv1, conv2, then the shortcut.
    assert [resnet_map[k] for k in convs] == [f"conv2d_{i}" for i in range(1, 34)]
    assert resnet_map["stage2_block1/shortcut"] == "conv2d_14"
    assert resnet_map["stage3_block1/shortcut"] == "conv2d_25"
    assert resnet_map["bn_final"] == "batch_normalization_31"
    assert resnet_map["logits"] == "dense_1"


def test_imported_values_and_config(imported):
    module, variables, metadata, path = imported["resnet"]
    with h5py.File(path, "r") as f:
        group = f["model_weights"]["conv2d_14"]["conv2d_14"]
        np.testing.assert_array_equal(
            variables["params"]["stage2_block1"]["shortcut"]["kernel"],
            group["kernel:0"][()],
        )
        bn = f["model_weights"]["batch_normalization_31"]["batch_normalization_31"]
        np.testing.assert_array_equal(
            variables["batch_stats"]["bn_final"]["var"], bn["moving_variance:0"][()]
        )
    assert module.mean == (125.307, 122.95, 113.865)
    assert module.std == (62.9932, 62.0887, 66.7048)
    assert models.count_params(variables) == 467946
    assert metadata["keras_version"] == "2.1.4"


def test_accuracy_lenet_is_70_00_percent(imported, test_split):
    module, variables, _, _ = imported["lenet"]
    images, labels = test_split
    probs = evaluation.predict(models.make_apply_fn(module), variables, images, 1000)
    summary = evaluation.accuracy_summary(probs, labels)
    assert summary["total"] == 10000
    assert summary["correct"] == 7000, summary["accuracy"]


def test_accuracy_resnet_on_the_first_1000_images(imported, test_split):
    """resnet.h5 on the first 1,000 test images (a tenth of the time): 825 correct,
    measured on 2026-12-07 (1,653 on the first 2,000, 2026-11-30) beside the whole
    set's 81.93% (README), +-1 for float rounding on other CPUs."""
    module, variables, _, _ = imported["resnet"]
    images, labels = test_split
    probs = evaluation.predict(
        models.make_apply_fn(module), variables, images[:1000], 1000
    )
    summary = evaluation.accuracy_summary(probs, labels[:1000])
    assert summary["total"] == 1000
    assert abs(summary["correct"] - 825) <= 1, summary["accuracy"]


def test_load_weights_dispatches_h5_to_keras_import(keras_weights_dir):
    config, variables, metadata = checkpoint.load_weights(
        "lenet", os.path.join(keras_weights_dir, "lenet.h5")
    )
    assert config.name == "lenet" and metadata["source"] == "keras"
    assert models.count_params(variables) == 62006


@pytest.mark.parametrize(
    "file, model, match",
    [
        (
            "lenet.h5",
            "resnet",
            r"lenet\.h5 does not have the layer structure of our "
            r"'resnet' model .*use `model_name='lenet'`",
        ),
        (
            "resnet.h5",
            "lenet",
            r"resnet\.h5 .* our 'lenet' model .*use `model_name='resnet'`",
        ),
        ("resnet.h5", "resnet20", r"more residual blocks.*use `model_name='resnet'`"),
        ("lenet.h5", "lenet_tiny", r"our 'lenet_tiny' model"),
    ],
)
def test_wrong_model_for_file(keras_weights_dir, file, model, match):
    with pytest.raises(WeightsError, match=match):
        keras_import.load_keras_weights(os.path.join(keras_weights_dir, file), model)


def test_not_hdf5_and_truncated_files(keras_weights_dir, tmp_path):
    not_h5 = tmp_path / "weights.h5"
    not_h5.write_text("hello")
    with pytest.raises(
        WeightsError, match=r"weights\.h5 is not a readable Keras 2 HDF5"
    ):
        keras_import.load_keras_weights(str(not_h5), "lenet")

    source = os.path.join(keras_weights_dir, "lenet.h5")
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(open(source, "rb").read()[: os.path.getsize(source) // 2])
    with pytest.raises(WeightsError, match=r"truncated\.h5 .*truncated or corrupt"):
        keras_import.load_keras_weights(str(truncated), "lenet")

    keras3 = tmp_path / "model.keras"
    keras3.write_bytes(b"PK\x03\x04" + b"\0" * 60)
    with pytest.raises(WeightsError, match=r"Keras 3 .*re-save"):
        keras_import.load_keras_weights(str(keras3), "lenet")

    with pytest.raises(WeightsError, match="does not exist"):
        keras_import.load_keras_weights(str(tmp_path / "absent.h5"), "lenet")


def test_file_without_model_config(keras_weights_dir, tmp_path):
    copy = tmp_path / "weights_only.h5"
    shutil.copy(os.path.join(keras_weights_dir, "lenet.h5"), copy)
    with h5py.File(copy, "r+") as f:
        del f.attrs["model_config"]
    with pytest.raises(
        WeightsError, match=r"weights_only\.h5 has no Keras model_config"
    ):
        keras_import.load_keras_weights(str(copy), "lenet")


def _edit_config(source: str, target, edit) -> None:
    import json

    shutil.copy(source, target)
    with h5py.File(target, "r+") as f:
        config = json.loads(f.attrs["model_config"])
        edit(config)
        f.attrs["model_config"] = json.dumps(config)


def test_structure_changes_are_detected(keras_weights_dir, tmp_path):
    source = os.path.join(keras_weights_dir, "resnet.h5")

    def stride_one(config):  # the first block of stage 2 without its stride
        for layer in config["config"]["layers"]:
            if layer["name"] in ("conv2d_12", "conv2d_14"):
                layer["config"]["strides"] = [1, 1]

    def shortcut_from_activation(config):  # projection from the activated input
        for layer in config["config"]["layers"]:
            if layer["name"] == "conv2d_14":
                layer["inbound_nodes"] = [[["activation_11", 0, 0, {}]]]

    def other_epsilon(config):
        for layer in config["config"]["layers"]:
            if layer["name"] == "batch_normalization_7":
                layer["config"]["epsilon"] = 1e-5

    cases = [
        (stride_one, r"block 6 has stride 1, our model expects 2"),
        (shortcut_from_activation, r"add_5 feeds|activation_11 feeds"),
        (other_epsilon, r"batch_normalization_7: epsilon 1e-05"),
    ]
    for edit, match in cases:
        target = tmp_path / f"{edit.__name__}.h5"
        _edit_config(source, target, edit)
        with pytest.raises(WeightsError, match=match):
            keras_import.load_keras_weights(str(target), "resnet")


def test_missing_weight_array_is_reported(keras_weights_dir, tmp_path):
    target = tmp_path / "damaged.h5"
    shutil.copy(os.path.join(keras_weights_dir, "lenet.h5"), target)
    with h5py.File(target, "r+") as f:
        group = f["model_weights"]["dense_2"]
        group.attrs["weight_names"] = [b"dense_2/kernel:0"]
    with pytest.raises(WeightsError, match=r"layer dense_2 lacks weights bias"):
        keras_import.load_keras_weights(str(target), "lenet")
