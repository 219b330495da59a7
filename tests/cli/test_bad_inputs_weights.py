"""Weights that cannot compute, and damaged weights files: one line, exit 2.

A checkpoint or Keras file with a NaN or inf variable, a model with another class
count than the data's, finite weights whose logits overflow: each is refused
through `launch.py` before any work, instead of exit 0 and NaN probabilities.
"""

import json
import os
import shutil

import h5py
import jax
import numpy as np
import pytest
from conftest import launch
from flax import serialization

from propmaps_jax import models
from propmaps_jax.errors import WeightsError
from propmaps_jax.models import checkpoint
from tests._fixtures import classified_images, save_lenet_tiny, save_npz


def _edit_leaf(variables, path: tuple[str, ...], edit):
    """A copy of `variables` with `edit(array)` at `path` (e.g. params/Dense_0)."""
    tree = jax.tree_util.tree_map(np.array, variables)
    node = tree
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = edit(node[path[-1]])
    return tree


def _first_kernel(variables) -> tuple[str, ...]:
    name = sorted(variables["params"])[0]
    return ("params", name, "kernel")


def _set(value):
    def edit(array):
        array = array.copy()
        array.flat[3] = value
        return array

    return edit


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad_weights")
    good = str(folder / "lenet_tiny.msgpack")
    module, variables = save_lenet_tiny(good, 5)
    x, y = classified_images(module, variables, 8, 0)
    config = models.ModelConfig("lenet_tiny")
    kernel = _first_kernel(variables)
    saved = {}
    for name, edit in [
        ("nan", _set(np.nan)),
        ("inf", _set(-np.inf)),
        # Finite, but every kernel 1e20 times larger: the logits overflow.
        ("overflow", None),
    ]:
        path = str(folder / f"{name}.msgpack")
        if edit is None:
            bad = jax.tree_util.tree_map(lambda a: np.asarray(a) * 1e20, variables)
        else:
            bad = _edit_leaf(variables, kernel, edit)
        checkpoint.save_checkpoint(path, config, bad)
        saved[name] = path
    three = models.ModelConfig("lenet_tiny", num_classes=3)
    path = str(folder / "three.msgpack")
    checkpoint.save_checkpoint(
        path,
        three,
        models.init_variables(models.create_model(three), jax.random.key(0)),
    )
    saved["three"] = path
    # Damaged msgpack checkpoints: no config, config or metadata not JSON.
    payload = serialization.msgpack_restore(open(good, "rb").read())
    for name, change in [
        ("no_config", lambda p: p.pop("config")),
        ("text_config", lambda p: p.update(config="{not json")),
        ("list_config", lambda p: p.update(config="[1, 2]")),
        ("short_config", lambda p: p.update(config=json.dumps({"name": "lenet"}))),
        ("bad_metadata", lambda p: p.update(metadata=b"\xff\xfe")),
    ]:
        copy = dict(payload)
        change(copy)
        path = str(folder / f"{name}.msgpack")
        with open(path, "wb") as f:
            f.write(serialization.msgpack_serialize(copy))
        saved[name] = path
    return {
        "folder": folder,
        "good": good,
        "npz": save_npz(folder / "tiny.npz", x, y),
        "kernel": "/".join(kernel),
        **saved,
    }


def _error_line(proc) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def _evaluate(files, weights, model="lenet_tiny", data=None):
    workdir = files["folder"] / f"eval_{os.path.basename(weights)}"
    return launch(
        "--experiment=evaluate",
        f"--model={model}",
        f"--weights={weights}",
        f"--cifar10_path={data or files['npz']}",
        f"--workdir={workdir}",
    )


def _attack(files, weights, workdir_name):
    workdir = files["folder"] / workdir_name
    proc = launch(
        "--experiment=attack",
        "--model=lenet_tiny",
        f"--weights={weights}",
        f"--cifar10_path={files['npz']}",
        "--num_samples=2",
        "--population=10",
        "--generations=1",
        f"--workdir={workdir}",
    )
    return proc, workdir


@pytest.mark.parametrize(
    "name, phrase",
    [
        ("nan", "holds NaN, so the model cannot compute"),
        ("inf", "holds inf, so the model cannot compute"),
    ],
)
def test_non_finite_checkpoint_is_refused_naming_the_variable(files, name, phrase):
    line = _error_line(_evaluate(files, files[name]))
    assert f"{name}.msgpack: variable {files['kernel']} {phrase}" in line
    assert "--weights" in line


def test_attack_refuses_non_finite_weights_before_any_work(files):
    proc, workdir = _attack(files, files["nan"], "attack_nan")
    line = _error_line(proc)
    assert f"nan.msgpack: variable {files['kernel']} holds NaN" in line
    assert not os.path.exists(workdir)


def test_other_class_count_than_the_data_is_refused(files):
    line = _error_line(_evaluate(files, files["three"]))
    assert "three.msgpack has 3 output classes, the data has 10" in line
    proc, workdir = _attack(files, files["three"], "attack_three")
    assert "has 3 output classes, the data has 10" in _error_line(proc)
    assert not os.path.exists(workdir)


def test_finite_weights_whose_logits_overflow_are_refused(files):
    line = _error_line(_evaluate(files, files["overflow"]))
    assert "overflow.msgpack gives non-finite logits" in line
    assert "of the first 4 images" in line
    proc, workdir = _attack(files, files["overflow"], "attack_overflow")
    assert "gives non-finite logits" in _error_line(proc)
    assert not os.path.exists(workdir)


def test_good_weights_still_evaluate(files):
    proc = _evaluate(files, files["good"])
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize(
    "name, phrase",
    [
        ("no_config", "no_config.msgpack has no 'config'"),
        ("text_config", "its 'config' is not a valid JSON config (JSONDecodeError"),
        ("list_config", "its 'config' is not a valid JSON config (TypeError"),
        ("short_config", "its 'config' is not a valid JSON config (KeyError"),
        ("bad_metadata", "its 'metadata' is not a valid JSON metadata"),
    ],
)
def test_damaged_checkpoint_is_one_line(files, name, phrase):
    assert phrase in _error_line(_evaluate(files, files[name]))


def test_cifar10_path_of_a_device_is_one_line(files):
    line = _error_line(_evaluate(files, files["good"], data="/dev/zero"))
    assert "/dev/zero is a character device" in line and "--cifar10_path" in line


# --- Keras .h5 files (copies of the public lenet.h5, changed).


def _keras_copy(keras_weights_dir, target, edit) -> str:
    shutil.copy(os.path.join(keras_weights_dir, "lenet.h5"), target)
    os.chmod(target, 0o644)
    with h5py.File(target, "r+") as f:
        edit(f["model_weights"])
    return str(target)


def _nan_kernel(group):
    kernel = group["conv2d_1"]["conv2d_1/kernel:0"]
    values = kernel[()]
    values.flat[0] = np.nan
    kernel[...] = values


def _bytes_kernel(group):
    layer = group["dense_2"]
    del layer["dense_2/bias:0"]
    layer.create_dataset("dense_2/bias:0", data=np.array([b"abc"] * 10))


def _huge_kernel(group):
    layer = group["dense_2"]
    del layer["dense_2/bias:0"]
    # Never written: HDF5 stores no chunk, reading it would need 4 TiB.
    layer.create_dataset("dense_2/bias:0", shape=(2**40,), dtype="f4", chunks=(1024,))


def test_keras_file_with_nan_is_refused(files, keras_weights_dir):
    path = _keras_copy(keras_weights_dir, files["folder"] / "nan.h5", _nan_kernel)
    line = _error_line(_evaluate(files, path, model="lenet"))
    assert "nan.h5: variable params/" in line and "holds NaN" in line


@pytest.mark.parametrize(
    "edit, phrase",
    [
        (_bytes_kernel, "weight dense_2/bias:0 holds |S3 values, not numbers"),
        (_huge_kernel, "weight dense_2/bias:0 has shape (1099511627776,)"),
    ],
)
def test_damaged_keras_file_is_one_line(files, keras_weights_dir, edit, phrase):
    target = files["folder"] / f"{edit.__name__}.h5"
    path = _keras_copy(keras_weights_dir, target, edit)
    with pytest.raises(WeightsError, match=None) as raised:
        checkpoint.load_weights("lenet", path)
    assert phrase in str(raised.value) and "\n" not in str(raised.value)
    assert phrase in _error_line(_evaluate(files, path, model="lenet"))
