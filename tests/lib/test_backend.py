"""Backend-specific choices (one table) and the attack's memory estimate.

Each backend is faked by monkeypatching `backend.platform_of` (and the device's
memory by `backend.device_memory_limit`): the programs still run on this CPU,
with the choices that platform would get.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from propmaps_jax import attack, backend, data, memory, models
from propmaps_jax.attack import engine as attack_engine
from propmaps_jax.errors import PropmapsError
from propmaps_jax.models import checkpoint, column_pair
from tests._attack_case import CONFIG, SLOTS, attack_case, lenet_case

ACCELERATORS = ("gpu", "cuda", "rocm", "tpu")


@pytest.fixture
def fake_platform(monkeypatch):
    """fake_platform(name): every device reads as `name` to the library."""

    def fake(name):
        monkeypatch.setattr(backend, "platform_of", lambda device=None: name)

    return fake


def test_every_choice_is_on_where_measured_only():
    for name, choice in backend.CHOICES.items():
        assert choice.platforms == ("cpu",) and "CPU" in choice.measured
        assert backend.enabled(name, "cpu")
        for platform in ACCELERATORS:
            assert not backend.enabled(name, platform), (name, platform)
    assert backend.normalize_platform("CUDA") == "gpu"
    with pytest.raises(PropmapsError, match="unknown backend choice 'fast'"):
        backend.enabled("fast", "cpu")


def test_default_platform_is_the_default_backend(fake_platform):
    assert backend.enabled("receptive_forward") == (jax.default_backend() == "cpu")
    fake_platform("tpu")
    assert not backend.enabled("column_pair_conv")


@pytest.mark.parametrize("platform,pairs", [("cpu", True), ("tpu", False)])
def test_lenet_layout_follows_the_backend(monkeypatch, fake_platform, platform, pairs):
    calls = []
    real = models.column_pair_conv

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(column_pair, "column_pair_conv", counted)
    fake_platform(platform)
    module = models.create_model("lenet_tiny")
    x = jnp.zeros((1, 32, 32, 3))
    jax.eval_shape(lambda: module.init(jax.random.key(0), x))
    assert bool(calls) == pairs
    # Fixed for a platform, whatever the current one.
    calls.clear()
    pinned = models.for_platform(module, "cpu" if platform == "tpu" else "tpu")
    jax.eval_shape(lambda: pinned.init(jax.random.key(0), x))
    assert bool(calls) != pairs


def test_lenet_layouts_share_parameters_and_logits():
    # Checkpoints load either way: the same parameter tree, and the bundled
    # LeNet's logits agree to a few float32 ulps (at most 4.8e-6 on these 64 test
    # images on this project's CPU, jax 0.10.2) with the same predictions.
    pairs = models.create_model("lenet").clone(column_pairs=True)
    plain = pairs.clone(column_pairs=False)
    x = jnp.zeros((1, 32, 32, 3))
    shapes = [
        jax.tree_util.tree_map(
            lambda a: (a.shape, a.dtype), jax.eval_shape(m.init, jax.random.key(0), x)
        )
        for m in (pairs, plain)
    ]
    assert shapes[0] == shapes[1]
    _, variables, _ = checkpoint.load_weights("lenet")
    test_batch = os.path.join(os.environ.get("CIFAR10_PATH", ""), "test_batch")
    if os.path.isfile(test_batch):  # the real test images where CI has them
        # Through the library's reader: a data file is never plainly unpickled.
        images = data.load_from_path(os.environ["CIFAR10_PATH"]).x_test[:64]
    else:
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, size=(64, 32, 32, 3), dtype=np.uint8)
    logits = [
        np.asarray(jax.jit(models.make_apply_fn(m))(variables, images))
        for m in (pairs, plain)
    ]
    np.testing.assert_allclose(logits[0], logits[1], atol=1e-5, rtol=1e-6)
    assert np.array_equal(logits[0].argmax(-1), logits[1].argmax(-1))


def test_receptive_default_by_backend_and_type():
    apply_fn = models.make_apply_fn(models.create_model("lenet_tiny"))
    assert attack.default_candidate_forward(apply_fn, None, CONFIG, "cpu") is not None
    for platform in ACCELERATORS:
        assert (
            attack.default_candidate_forward(apply_fn, None, CONFIG, platform) is None
        )

    class LooksLikeOne:  # has a `module`, is not an InferenceApply: no duck typing
        module = apply_fn.module

        def __call__(self, variables, images):
            return apply_fn(variables, images)

    assert attack.default_candidate_forward(LooksLikeOne(), None, CONFIG, "cpu") is None


class _Built(Exception):
    """Raised by the spy instead of compiling: the test only needs the arguments."""


def _spy_programs(monkeypatch, build: bool = True):
    seen = []
    real = attack_engine.build_programs

    def spy(*args):
        seen.append(args)
        if not build:
            raise _Built
        return real(*args)

    monkeypatch.setattr(attack_engine, "build_programs", spy)
    return seen


def test_attack_choices_per_backend_give_the_same_attack(monkeypatch, fake_platform):
    # The CPU's result is the one tests/lib/test_attack.py computes (its program is
    # cached there); the TPU's choices: the plain forward, no buckets.
    cpu = attack_case(SLOTS)
    seen = _spy_programs(monkeypatch)
    fake_platform("tpu")
    tpu = attack_case(SLOTS)
    assert seen[-1][7] is None and seen[-1][8] is False
    for field in ("success", "pixels", "pred_after", "generations"):
        np.testing.assert_array_equal(getattr(cpu, field), getattr(tpu, field))
    np.testing.assert_allclose(cpu.prob_true_after, tpu.prob_true_after, atol=1e-5)
    # And the CPU's: the receptive forward, buckets.
    fake_platform("cpu")
    seen = _spy_programs(monkeypatch, build=False)
    with pytest.raises(_Built):
        attack_case()
    assert seen[-1][7] is not None and seen[-1][8] is True


def test_peak_live_bytes_hand_computed():
    n = 10  # float32 (n, 4): 160 bytes a value

    def chain(x):
        return jnp.sum((x * 2.0) + 1.0)  # x, x*2, +1: two values live at once

    def residual(x):
        a = x * 2.0
        b = a * 3.0
        return x + b  # x stays live to the end: x, a, b at once

    x = jax.ShapeDtypeStruct((n, 4), jnp.float32)
    assert memory.peak_live_bytes(jax.make_jaxpr(chain)(x).jaxpr) == 2 * 160
    assert memory.peak_live_bytes(jax.make_jaxpr(residual)(x).jaxpr) == 3 * 160
    # A call's inner peak counts: the same chain under jit.
    assert memory.peak_live_bytes(jax.make_jaxpr(jax.jit(residual))(x).jaxpr) == 480


def test_forward_bytes_per_candidate_against_xla_on_cpu():
    # The count is an estimate; XLA's CPU buffer assignment of the same forward
    # (its temporaries plus the float32 input) must be within a factor of 2.
    module = models.for_platform(models.create_model("resnet_tiny"), "tpu")
    apply_fn = models.make_apply_fn(module)
    variables = jax.eval_shape(
        lambda: module.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    )
    per_candidate = memory.forward_bytes_per_candidate(apply_fn, variables)
    batch = 32
    x = jax.ShapeDtypeStruct((batch, 32, 32, 3), jnp.float32)
    analysis = jax.jit(apply_fn).lower(variables, x).compile().memory_analysis()
    xla = (analysis.temp_size_in_bytes + 32 * 32 * 3 * 4 * batch) / batch
    # resnet_tiny's largest activation: 32 x 32 x 4 floats, 16 KiB.
    assert 2 * 16384 <= per_candidate <= 8 * 16384
    assert 0.5 <= xla / per_candidate <= 2.0, (xla, per_candidate)


def _resnet32_estimate():
    module = models.for_platform(models.create_model("resnet"), "tpu")
    variables = jax.eval_shape(
        lambda: module.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    )
    return memory.attack_memory(models.make_apply_fn(module), variables, 1, 400, 10000)


def test_default_slots_fit_the_device_memory():
    estimate = _resnet32_estimate()
    gib = 2**30
    per_slot = (
        400 * (estimate.per_candidate + estimate.per_candidate_state)
        + estimate.per_slot_search
    )

    def total(slots):
        return estimate.weights + estimate.queue + slots * per_slot

    # TPU v5e (about 15.75 GiB), a T4 at JAX's 75% preallocation (about 11 GiB), a
    # 4 GiB device, an H100 (80 GiB) and an H200 (141 GiB) at 75%.
    for limit in (15.75 * gib, 11 * gib, 4 * gib, 60 * gib, 105 * gib):
        slots = attack.default_slots(
            400, 10**6, 1, "tpu", memory_bytes=limit, estimate=estimate
        )
        assert 1 <= slots <= 82
        assert total(slots) <= memory.MEMORY_FRACTION * limit
        # As many as fit, up to the accelerator's default batch.
        assert slots == 82 or total(slots + 1) > memory.MEMORY_FRACTION * limit
        if limit >= 15 * gib:
            assert slots == 82, limit
    assert (
        attack.default_slots(
            400, 10**6, 1, "gpu", memory_bytes=11 * gib, estimate=estimate
        )
        < 82
    )
    # No memory reported (a CPU): the backend's default as before.
    assert attack.default_slots(400, 10**6, 1, "gpu") == 82


def test_attack_slots_from_a_faked_device_memory(monkeypatch, fake_platform):
    apply_fn, variables, images, _, _ = lenet_case()
    seen = _spy_programs(monkeypatch, build=False)
    fake_platform("gpu")
    estimate, _ = attack.memory_estimate(apply_fn, variables, CONFIG, 1, len(images))
    per_slot = (
        estimate.per_candidate + estimate.per_candidate_state
    ) * 8 + estimate.per_slot_search
    fixed = estimate.weights + estimate.queue
    # Room for 3 slots in half the memory.
    limit = int((fixed + 3.5 * per_slot) / memory.MEMORY_FRACTION)
    monkeypatch.setattr(backend, "device_memory_limit", lambda device: limit)
    with pytest.raises(_Built):
        attack_case()
    assert seen[-1][3] == 3
    # A user's slots win, even beyond what the estimate allows.
    with pytest.raises(_Built):
        attack_case(slots=5)
    assert seen[-1][3] == 5
    assert attack.memory_estimate(apply_fn, variables, CONFIG, 5, 8)[1] == limit
