"""Training: optimizer and schedule against hand-computed values, augmentation, steps,
BatchNorm statistics, and the train experiment's resume-after-interruption."""

import functools
import hashlib
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from propmaps_jax import checkpoint, data, models, training
from propmaps_jax.errors import PropmapsError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_schedule_values():
    schedule = training.make_schedule(0.1, total_steps=100, warmup_steps=10)
    expected = {
        0: 0.0,
        5: 0.05,
        10: 0.1,
        # cosine over the 90 steps after warmup: 0.1 * (1 + cos(pi * t / 90)) / 2
        40: 0.05 * (1 + math.cos(math.pi * 30 / 90)),
        55: 0.05,
        100: 0.0,
    }
    for step, value in expected.items():
        np.testing.assert_allclose(float(schedule(step)), value, atol=1e-7)
    no_warmup = training.make_schedule(0.2, total_steps=10, warmup_steps=0)
    np.testing.assert_allclose(float(no_warmup(0)), 0.2, rtol=1e-6)
    np.testing.assert_allclose(float(no_warmup(5)), 0.1, rtol=1e-6)


@pytest.mark.parametrize("warmup", [10, 11])
def test_schedule_rejects_warmup_longer_than_training(warmup):
    with pytest.raises(PropmapsError, match="warmup"):
        training.make_schedule(0.1, total_steps=10, warmup_steps=warmup)


def test_kernel_mask_selects_kernels_only(tiny_resnet):
    _, variables = tiny_resnet
    mask = training.kernel_mask(variables["params"])
    flat = {
        jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(mask)
    }
    assert flat["['stem']['kernel']"] is True
    assert flat["['stem']['bias']"] is False
    assert flat["['stage1_block1']['bn1']['scale']"] is False
    assert flat["['logits']['kernel']"] is True
    assert sum(flat.values()) == sum("kernel" in k for k in flat)


def test_optimizer_is_nesterov_sgd_with_kernel_decay():
    lr, wd, mu = 0.1, 0.01, 0.9
    params = {
        "dense": {
            "kernel": jnp.array([[1.0, -2.0]]),
            "bias": jnp.array([0.5, 3.0]),
        }
    }
    grads = [
        {"dense": {"kernel": jnp.array([[0.3, 0.1]]), "bias": jnp.array([1.0, -1.0])}},
        {"dense": {"kernel": jnp.array([[-0.2, 0.4]]), "bias": jnp.array([0.5, 0.5])}},
    ]
    # warmup over 2 of 4 steps: learning rates 0 and lr/2 for the two steps
    tx = training.make_optimizer(lr, wd, total_steps=4, warmup_steps=2)
    state = tx.init(params)
    p = params
    for g in grads:
        updates, state = tx.update(g, state, p)
        p = jax.tree_util.tree_map(lambda a, u: a + u, p, updates)

    # float64 reference: g' = g + wd * w (kernels only); m = g' + mu m;
    # w -= lr_t * (g' + mu m)   (Nesterov)
    ref = {k: np.asarray(v, np.float64) for k, v in params["dense"].items()}
    momentum = {k: np.zeros_like(v) for k, v in ref.items()}
    for step, g in enumerate(grads):
        lr_t = lr * step / 2
        for k in ref:
            d = np.asarray(g["dense"][k], np.float64)
            if k == "kernel":
                d = d + wd * ref[k]
            momentum[k] = d + mu * momentum[k]
            ref[k] = ref[k] - lr_t * (d + mu * momentum[k])
    for k in ref:
        np.testing.assert_allclose(np.asarray(p["dense"][k]), ref[k], rtol=1e-6)


def _augmentation_reference(image, out, padding_mode):
    """Which (dy, dx, flip) of the padded image gives `out` (brute force, NumPy)."""
    pad = ((4, 4), (4, 4), (0, 0))
    padded = np.pad(
        image, pad, mode="reflect" if padding_mode == "reflect" else "constant"
    )
    found = []
    for dy in range(9):
        for dx in range(9):
            crop = padded[dy : dy + 32, dx : dx + 32]
            for flip in (False, True):
                if np.array_equal(crop[:, ::-1] if flip else crop, out):
                    found.append((dy, dx, flip))
    return found


@pytest.mark.parametrize("padding_mode", ["reflect", "constant"])
def test_augment_is_a_crop_and_flip(padding_mode):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(24, 32, 32, 3), dtype=np.uint8)
    indices = np.arange(100, 124, dtype=np.int32)
    key = jax.random.key(3)
    out = np.asarray(training.augment(key, images, indices, padding_mode))
    assert out.shape == images.shape and out.dtype == np.uint8
    choices = []
    for image, result in zip(images, out, strict=True):
        found = _augmentation_reference(image, result, padding_mode)
        assert found, "output is not a 4-pixel-padded crop (or its mirror) of the input"
        choices.append(found[0])
    flips = {c[2] for c in choices}
    offsets = {c[:2] for c in choices}
    assert flips == {False, True} and len(offsets) > 5
    # deterministic, and each example's result depends only on its own index
    again = training.augment(key, images[5:9], indices[5:9], padding_mode)
    np.testing.assert_array_equal(np.asarray(again), out[5:9])
    other = np.asarray(
        training.augment(jax.random.key(4), images, indices, padding_mode)
    )
    assert not np.array_equal(other, out)


def test_augment_rejects_unknown_padding():
    with pytest.raises(PropmapsError, match="padding_mode"):
        training.augment(jax.random.key(0), np.zeros((1, 32, 32, 3)), np.zeros(1), "x")


def test_epoch_permutation_is_deterministic_per_seed_and_epoch():
    a = training.epoch_permutation(0, 3, 50)
    np.testing.assert_array_equal(a, training.epoch_permutation(0, 3, 50))
    np.testing.assert_array_equal(np.sort(a), np.arange(50))
    assert not np.array_equal(a, training.epoch_permutation(0, 4, 50))
    assert not np.array_equal(a, training.epoch_permutation(1, 3, 50))


def test_train_steps_reduce_loss_lenet():
    # 4 classes told apart by brightness: learnable by the tiny LeNet in a few steps
    rng = np.random.default_rng(0)
    labels = np.arange(16, dtype=np.int32) % 4
    noise = rng.normal(0, 20, (16, 32, 32, 3))
    images = np.clip(noise + 60 * labels[:, None, None, None] + 30, 0, 255)
    images = images.astype(np.uint8)
    module = models.create_model("lenet_tiny")
    tx = training.make_optimizer(0.1, 1e-4, total_steps=30, warmup_steps=0)
    state = training.create_train_state(module, tx, jax.random.key(0))
    assert state.batch_stats == {} and set(state.variables) == {"params"}
    step = jax.jit(
        functools.partial(training.train_step, module, tx, do_augment=False),
        donate_argnums=(0,),
    )
    evaluate = jax.jit(functools.partial(training.eval_step, module))
    before = evaluate(state.variables, images, labels)
    for _ in range(30):
        state, metrics = step(state, images, labels, np.arange(16), jax.random.key(1))
    after = evaluate(state.variables, images, labels)
    assert int(state.step) == 30
    assert float(after["loss"]) < 0.5 * float(before["loss"])
    assert np.isfinite(float(metrics["loss"]))


def test_eval_step_masks_padding(tiny_lenet, random_images):
    module, variables = tiny_lenet
    labels = np.arange(8, dtype=np.int32)
    mask = np.array([1, 1, 1, 0, 1, 0, 0, 1], bool)
    out = training.eval_step(module, variables, random_images, labels, mask)
    logits = np.asarray(
        module.apply(variables, random_images.astype(np.float32)), np.float64
    )
    log_probs = (
        logits
        - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - logits.max(-1, keepdims=True)
    )
    losses = -log_probs[np.arange(8), labels]
    assert float(out["count"]) == 5
    np.testing.assert_allclose(float(out["loss"]), losses[mask].sum(), rtol=1e-5)
    assert float(out["correct"]) == np.sum((logits.argmax(-1) == labels)[mask])


def test_batchnorm_statistics_update_in_train_mode(tiny_resnet, random_images):
    module, variables = tiny_resnet
    tx = training.make_optimizer(0.1, 0.0, total_steps=10, warmup_steps=0)
    state = training.state_from_variables(variables, tx)
    labels = np.zeros(8, np.int32)
    step = jax.jit(functools.partial(training.train_step, module, tx, do_augment=False))
    new_state, _ = step(state, random_images, labels, np.arange(8), jax.random.key(0))
    # the first BatchNorm normalises the stem's output: running mean moves by 1 - 0.99
    _, layers = models.layer_outputs(
        module, variables, random_images.astype(np.float32)
    )
    stem = np.asarray(layers["stem"], np.float64)
    old = variables["batch_stats"]["stage1_block1"]["bn1"]
    new = new_state.batch_stats["stage1_block1"]["bn1"]
    expected_mean = 0.99 * np.asarray(old["mean"]) + 0.01 * stem.mean((0, 1, 2))
    expected_var = 0.99 * np.asarray(old["var"]) + 0.01 * stem.var((0, 1, 2))
    np.testing.assert_allclose(
        np.asarray(new["mean"]), expected_mean, rtol=1e-4, atol=1e-5
    )
    np.testing.assert_allclose(
        np.asarray(new["var"]), expected_var, rtol=1e-4, atol=1e-4
    )


# --- the train experiment, end to end (subprocesses: its absl flags stay out of pytest)


@pytest.fixture(scope="module")
def tiny_npz(tmp_path_factory):
    rng = np.random.default_rng(0)

    def split(n):
        labels = rng.integers(0, 10, n)
        images = rng.normal(0, 30, (n, 32, 32, 3)) + 20 * labels[:, None, None, None]
        return np.clip(images, 0, 255).astype(np.uint8), labels

    x_train, y_train = split(96)
    x_test, y_test = split(40)
    path = tmp_path_factory.mktemp("data") / "tiny.npz"
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return str(path)


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """A persistent XLA cache shared by the subprocesses: each compiles only once."""
    return str(tmp_path_factory.mktemp("xla_cache"))


def _train(workdir, data, cache, *extra):
    cmd = [
        sys.executable,
        "launch.py",
        "--experiment=train",
        "--model=resnet_tiny",
        "--epochs=2",
        "--batch_size=32",
        "--eval_batch_size=16",
        f"--cifar10_path={data}",
        f"--workdir={workdir}",
        *extra,
    ]
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "JAX_COMPILATION_CACHE_DIR": cache,
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)


def test_resume_after_interruption_gives_identical_model(
    tmp_path, tiny_npz, compile_cache
):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    result = _train(straight, tiny_npz, compile_cache)
    assert result.returncode == 0, result.stderr
    result = _train(interrupted, tiny_npz, compile_cache, "--stop_after_epochs=1")
    assert result.returncode == 0, result.stderr
    assert not (interrupted / "model.msgpack").exists()
    assert (interrupted / "checkpoint.msgpack").exists()

    # other settings on the same workdir: a clear one-line error, no traceback
    result = _train(interrupted, tiny_npz, compile_cache, "--learning_rate=0.2")
    assert result.returncode == 2
    assert "--learning_rate=0.1 (now 0.2)" in result.stderr
    assert "Traceback" not in result.stderr

    result = _train(interrupted, tiny_npz, compile_cache)
    assert result.returncode == 0, result.stderr
    assert "resuming from" in result.stderr
    a = checkpoint.read_checkpoint(str(straight / "model.msgpack"))
    b = checkpoint.read_checkpoint(str(interrupted / "model.msgpack"))
    leaves_a = jax.tree_util.tree_leaves_with_path(a["variables"])
    leaves_b = jax.tree_util.tree_leaves(b["variables"])
    assert len(leaves_a) == len(leaves_b) > 0
    assert any("batch_stats" in jax.tree_util.keystr(k) for k, _ in leaves_a)
    for (path, x), y in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))
    assert a["metadata"]["test_accuracy"] == b["metadata"]["test_accuracy"]
    assert b["metadata"]["epochs"] == 2 and b["metadata"]["seed"] == 0
    assert "stop_after_epochs" not in b["metadata"]["command"]
    # the final model loads as --weights, without optimizer state
    config, variables, _ = checkpoint.load_weights(
        "resnet_tiny", str(straight / "model.msgpack")
    )
    assert config.name == "resnet_tiny" and b["train_state"] is None


def test_fine_tuning_starts_from_the_given_weights(tmp_path, tiny_npz, compile_cache):
    """--init_weights: the run starts from those weights (its epoch-0 evaluation is
    theirs), the starting file's content is part of the settings (not its path), and
    resume is bit-identical."""
    base = tmp_path / "base"
    # --epochs=1 with the default 1-epoch warm-up: the warm-up is capped, not refused
    result = _train(base, tiny_npz, compile_cache, "--epochs=1")
    assert result.returncode == 0, result.stderr
    assert "warm-up capped at 1 steps, half of the run's 3" in result.stderr
    init = str(base / "model.msgpack")
    base_accuracy = checkpoint.read_checkpoint(init)["metadata"]["test_accuracy"]

    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    result = _train(straight, tiny_npz, compile_cache, f"--init_weights={init}")
    assert result.returncode == 0, result.stderr
    assert "fine-tuning from" in result.stderr
    meta = checkpoint.read_checkpoint(str(straight / "model.msgpack"))["metadata"]
    history = json.loads((straight / "train.json").read_text())["history"]
    assert history[0]["epoch"] == 0
    assert history[0]["test_accuracy"] == pytest.approx(base_accuracy)
    digest = hashlib.sha256((base / "model.msgpack").read_bytes()).hexdigest()
    assert meta["settings"]["init_weights_sha256"] == digest
    assert meta["init_weights"] == init

    result = _train(
        interrupted,
        tiny_npz,
        compile_cache,
        f"--init_weights={init}",
        "--stop_after_epochs=1",
    )
    assert result.returncode == 0, result.stderr
    # resuming from other starting weights is refused in one line
    result = _train(interrupted, tiny_npz, compile_cache)
    assert result.returncode == 2
    assert f"--init_weights of SHA-256 {digest[:12]} (now none)" in result.stderr
    assert "Traceback" not in result.stderr
    # the same file under another name (a symlink, by a relative path) resumes
    link = tmp_path / "same-weights.msgpack"
    link.symlink_to(init)
    relative = os.path.relpath(link, ROOT)
    result = _train(interrupted, tiny_npz, compile_cache, f"--init_weights={relative}")
    assert result.returncode == 0, result.stderr
    assert "resuming from" in result.stderr
    a = checkpoint.read_checkpoint(str(straight / "model.msgpack"))["variables"]
    b = checkpoint.read_checkpoint(str(interrupted / "model.msgpack"))["variables"]
    for x, y in zip(
        jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True
    ):
        np.testing.assert_array_equal(x, y)

    # the run trains the starting weights' model: their normalisation is kept
    config, variables, _ = checkpoint.load_weights("resnet_tiny", init)
    custom = models.ModelConfig(
        "resnet_tiny", mean=(100.0, 90.0, 80.0), std=(50.0, 40.0, 30.0)
    )
    renormalised = tmp_path / "renormalised.msgpack"
    checkpoint.save_checkpoint(str(renormalised), custom, variables)
    result = _train(
        tmp_path / "renorm",
        tiny_npz,
        compile_cache,
        f"--init_weights={renormalised}",
        "--epochs=1",
        "--warmup_epochs=0",
    )
    assert result.returncode == 0, result.stderr
    tuned = checkpoint.read_checkpoint(str(tmp_path / "renorm" / "model.msgpack"))
    assert tuned["config"] == custom
    with np.load(tiny_npz) as split:
        x_test, y_test = split["x_test"], split["y_test"]
    expected = training.eval_step(
        models.create_model(custom), variables, x_test, y_test
    )
    history = json.loads((tmp_path / "renorm" / "train.json").read_text())["history"]
    assert history[0]["test_accuracy"] == pytest.approx(
        float(expected["correct"]) / len(y_test)
    )

    # a missing file or the weights of another model: one line, exit 2
    result = _train(tmp_path / "x", tiny_npz, compile_cache, "--init_weights=nope.h5")
    assert result.returncode == 2 and "--init_weights=nope.h5 does not exist" in (
        result.stderr
    )
    broken = tmp_path / "broken.msgpack"
    broken.write_bytes(b"\x00" * 64)
    result = _train(tmp_path / "z", tiny_npz, compile_cache, f"--init_weights={broken}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "truncated or corrupt" in result.stderr
    assert "--init_weights" in result.stderr.splitlines()[-1]
    assert not (tmp_path / "z" / "checkpoint.msgpack").exists()
    lenet = tmp_path / "lenet.msgpack"
    module = models.create_model("lenet_tiny")
    checkpoint.save_checkpoint(
        str(lenet),
        models.ModelConfig("lenet_tiny"),
        models.init_variables(module, jax.random.key(0)),
    )
    result = _train(tmp_path / "y", tiny_npz, compile_cache, f"--init_weights={lenet}")
    assert result.returncode == 2 and "not 'resnet_tiny'" in result.stderr
    assert "Traceback" not in result.stderr


def test_first_step_loss_of_given_weights_is_their_loss(tiny_resnet, random_images):
    """A state built around given weights computes its first loss with exactly them."""
    module, variables = tiny_resnet
    labels = np.arange(len(random_images)) % 10
    optimizer = training.make_optimizer(0.1, 5e-4, total_steps=10)
    state = training.state_from_variables(variables, optimizer)
    _, metrics = training.train_step(
        module,
        optimizer,
        state,
        random_images,
        labels,
        np.arange(len(labels)),
        jax.random.key(0),
        do_augment=False,
    )
    logits, _ = module.apply(
        variables,
        random_images.astype(np.float32),
        train=True,
        mutable=["batch_stats"],
    )
    logits = np.asarray(logits, np.float64)
    log_probs = (
        logits
        - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1))[:, None]
        - logits.max(-1)[:, None]
    )
    expected = -log_probs[np.arange(len(labels)), labels].mean()
    assert float(metrics["loss"]) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("name, floor", [("lenet", 0.74), ("resnet", 0.88)])
def test_bundled_model_reaches_its_stated_accuracy(cifar10_path, name, floor):
    config, variables, metadata = checkpoint.load_weights(name)
    assert config.name == name and metadata["test_accuracy"] >= floor
    dataset = data.load_cifar10(cifar10_path)
    module = models.create_model(config)
    evaluate = jax.jit(functools.partial(training.eval_step, module))
    correct = sum(
        float(evaluate(variables, x, y)["correct"])
        for x, y in zip(
            np.split(dataset.x_test, 10), np.split(dataset.y_test, 10), strict=True
        )
    )
    assert correct / len(dataset.y_test) == pytest.approx(metadata["test_accuracy"])


def test_training_diverges_with_one_line_and_keeps_the_last_good_checkpoint(
    tmp_path, tiny_npz, compile_cache
):
    """--learning_rate=1e6: the run stops at the first non-finite loss, saves no
    non-finite model (no model.msgpack, no train.json) and keeps the last checkpoint
    written while everything was finite (the first step, at warm-up rate 0)."""
    workdir = tmp_path / "diverged"
    result = _train(
        workdir,
        tiny_npz,
        compile_cache,
        "--learning_rate=1e6",
        "--checkpoint_every_steps=1",
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: training diverged at epoch 1 (")
    assert "lower --learning_rate (now 1e+06)" in last
    assert f"the last good checkpoint ({workdir / 'checkpoint.msgpack'}" in last
    assert sorted(p.name for p in workdir.iterdir()) == ["checkpoint.msgpack"]
    saved = checkpoint.read_checkpoint(str(workdir / "checkpoint.msgpack"))
    assert saved["metadata"]["step"] >= 1
    assert bool(training.all_finite(saved["variables"]))
    json.dumps(saved["metadata"], allow_nan=False)


def test_all_finite():
    tree = {"a": jnp.ones(3), "b": {"c": np.arange(4)}}
    assert bool(training.all_finite(tree))
    assert not bool(training.all_finite({**tree, "d": jnp.array([1.0, jnp.nan])}))
    assert not bool(training.all_finite({"d": np.array([np.inf], np.float32)}))
    assert bool(training.all_finite({}))


@pytest.mark.parametrize(
    "learning_rate, weight_decay, message",
    [
        (0.0, 0.0, "`learning_rate` must be a positive number, got 0.0"),
        (float("nan"), 0.0, "`learning_rate` must be a positive number, got nan"),
        (float("inf"), 0.0, "`learning_rate` must be a positive number, got inf"),
        (0.1, -1.0, "`weight_decay` must be a number >= 0, got -1.0"),
        (0.1, float("nan"), "`weight_decay` must be a number >= 0, got nan"),
    ],
)
def test_optimizer_rejects_non_finite_or_non_positive_rates(
    learning_rate, weight_decay, message
):
    with pytest.raises(PropmapsError) as error:
        training.make_optimizer(learning_rate, weight_decay, total_steps=10)
    assert str(error.value) == message


# --- the train experiment's helpers, in-process


@pytest.fixture(scope="module")
def train_experiment():
    import experiments.train

    return experiments.train


def test_json_safe_writes_non_finite_numbers_as_null(train_experiment):
    value = {"a": float("nan"), "b": [1.5, np.float32(np.inf), -np.inf], "c": "x"}
    safe = train_experiment.json_safe(value)
    assert safe == {"a": None, "b": [1.5, None, None], "c": "x"}
    json.dumps(safe, allow_nan=False)


def test_workdir_checked_before_anything_is_written(train_experiment, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(PropmapsError, match="--workdir is required"):
        train_experiment.workdir_path(None)
    with pytest.raises(PropmapsError, match=f"--workdir={a_file} is a file"):
        train_experiment.workdir_path(str(a_file))
    with pytest.raises(PropmapsError, match=f"is under {a_file}, which is a file"):
        train_experiment.workdir_path(str(a_file / "sub" / "dir"))
    new = tmp_path / "new" / "run"
    assert train_experiment.workdir_path(str(new)) == str(new)
    assert not (tmp_path / "new").exists()  # checked, not created

    assert train_experiment.prepare_workdir(str(new)) is True
    assert new.is_dir() and list(new.iterdir()) == []  # the probe file is gone
    assert train_experiment.prepare_workdir(str(new)) is False
    train_experiment.remove_if_empty(str(new), created=True)
    assert not new.exists()


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc")
def test_unwritable_workdir_is_one_line(train_experiment, tmp_path):
    # /proc refuses new files even to root (chmod does not stop root).
    with pytest.raises(PropmapsError, match="--workdir=/proc is not writable"):
        train_experiment.prepare_workdir("/proc")
    with pytest.raises(PropmapsError, match="--workdir=/proc/propmaps is not writable"):
        train_experiment.prepare_workdir("/proc/propmaps")
    if os.geteuid() != 0:
        read_only = tmp_path / "read_only"
        read_only.mkdir()
        read_only.chmod(0o555)
        with pytest.raises(PropmapsError, match="is not writable"):
            train_experiment.prepare_workdir(str(read_only))


def test_resume_compares_the_starting_weights_by_content(train_experiment):
    digest = "ab" * 32
    settings = {"model": "lenet", "init_weights_sha256": digest}
    check = train_experiment.check_settings
    check(dict(settings), settings, "ckpt")
    # a checkpoint written before the full hash was recorded: name + 16 digits
    check(
        {"model": "lenet", "init_weights": f"old-name.h5 sha256:{digest[:16]}"},
        settings,
        "ckpt",
    )
    with pytest.raises(PropmapsError) as error:
        check({"model": "lenet", "init_weights": None}, settings, "ckpt")
    assert "--init_weights of none (now SHA-256 abababababab)" in str(error.value)
    with pytest.raises(PropmapsError) as error:
        check({"model": "resnet", "init_weights_sha256": digest}, settings, "ckpt")
    assert "--model='resnet' (now 'lenet')" in str(error.value)
