"""The public API a user's own model meets: `make_apply_fn` on any linen module
(with or without a `train` argument, one clear error otherwise), the perturbation
helper beside the attack, and the attack's default images per step on a CPU for a
model the project does not know."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import propmaps_jax as pj
from propmaps_jax.attack import perturb
from propmaps_jax.errors import PropmapsError


class NoTrain(nn.Module):
    """A user's CNN whose __call__ has no `train` argument."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3), name="conv1")(x / 255.0))
        return nn.Dense(10, name="head")(x.mean(axis=(1, 2)))


class WithTrain(NoTrain):
    """The same network with the project's `train` argument."""

    @nn.compact
    def __call__(self, x, train: bool = True):
        assert not train, "make_apply_fn runs in inference mode"
        return NoTrain(name="net")(x)


class TwoInputs(nn.Module):
    @nn.compact
    def __call__(self, x, mask):
        return nn.Dense(10)(x * mask)


class NoCall(nn.Module):
    def setup(self):
        self.dense = nn.Dense(10)


def _images(n: int = 3) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)


def test_attack_names_the_perturbation_helpers():
    assert pj.attack.apply_pixels is perturb.apply_pixels
    assert pj.attack.apply_pixels_batch is perturb.apply_pixels_batch
    assert {"apply_pixels", "apply_pixels_batch", "move_pixels"} <= set(
        pj.attack.__all__
    )
    image = np.zeros((4, 4, 3), np.uint8)
    out = pj.attack.apply_pixels(image, np.array([[1, 2, 255, 0, 9]]))
    assert out.dtype == np.uint8 and out[1, 2].tolist() == [255, 0, 9]
    assert int(np.asarray(out).sum()) == 264


@pytest.mark.parametrize("module", [NoTrain(), WithTrain()])
def test_make_apply_fn_takes_a_module_with_or_without_train(module):
    images = _images()
    variables = NoTrain().init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
    if isinstance(module, WithTrain):
        variables = {"params": {"net": variables["params"]}}
    apply_fn = pj.models.make_apply_fn(module)
    want = NoTrain().apply(_inner(variables), jnp.asarray(images, jnp.float32))
    np.testing.assert_allclose(apply_fn(variables, images), want, rtol=1e-6)
    # Hashable and equal for equal modules: compiled programs are cached on it.
    assert apply_fn == pj.models.make_apply_fn(module)
    assert hash(apply_fn) == hash(pj.models.make_apply_fn(module))
    np.testing.assert_allclose(jax.jit(apply_fn)(variables, images), want, rtol=1e-6)


def _inner(variables):
    """The variables of the NoTrain network inside either module."""
    params = variables["params"]
    return {"params": params["net"] if "net" in params else params}


def test_the_attack_runs_on_a_module_without_train():
    module = NoTrain()
    variables = module.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
    apply_fn = pj.models.make_apply_fn(module)
    images = _images(2)
    labels = np.asarray(jnp.argmax(apply_fn(variables, images), -1), np.int32)
    config = pj.attack.AttackConfig(population=8, generations=2)
    result = pj.attack.attack(
        apply_fn, variables, images, labels, np.arange(2), jax.random.key(1), config
    )
    assert result.pixels.shape == (2, 1, 5)


@pytest.mark.parametrize(
    "module, init_kwargs", [(NoTrain(), {}), (WithTrain(), {"train": False})]
)
def test_propagation_maps_of_a_module_with_or_without_train(module, init_kwargs):
    """One contract for the attack and the maps: the maps of a result are those of
    the clean and the perturbed image taken apart (|FM - FM_adv| by hand)."""
    variables = module.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), **init_kwargs)
    images = _images(2)
    pixels = np.array([[[1, 2, 255, 0, 0]], [[5, 6, 0, 0, 255]]], np.int32)
    model = pj.models.linen_features(module)
    maps = pj.analysis.propagation.maps_of_result(model, variables, images, pixels)
    (layer,) = maps["order"]
    assert layer.endswith("conv1")
    clean = pj.analysis.propagation.feature_maps(model, variables, images)[layer]
    adversarial = pj.analysis.propagation.feature_maps(
        model, variables, pj.attack.apply_pixels_batch(images, pixels)
    )[layer]
    expected = np.abs(np.asarray(clean) - np.asarray(adversarial)).max(-1)
    np.testing.assert_allclose(maps["pm"]["max"][layer], expected, rtol=1e-6)


@pytest.mark.parametrize(
    "model, words",
    [
        (lambda variables, images: images, "takes a flax.linen Module, got function"),
        (TwoInputs(), "its __call__ takes (x, mask)"),
        (NoCall(), "NoCall has none usable"),
    ],
)
def test_make_apply_fn_refuses_what_it_cannot_call_in_one_line(model, words):
    with pytest.raises(PropmapsError) as error:
        pj.models.make_apply_fn(model)
    message = str(error.value)
    assert words in message and "\n" not in message
    assert "apply_fn(variables, images) -> logits" in message


def test_a_model_the_project_does_not_know_gets_more_images_per_cpu_step():
    """The CPU default batch is 512 candidates for the project's models (one image
    at population 400) and 4096 for any other model (driver.py says why)."""
    assert pj.attack.is_project_model(
        pj.models.make_apply_fn(pj.models.create_model("lenet_tiny"))
    )
    assert not pj.attack.is_project_model(pj.models.make_apply_fn(NoTrain()))
    assert not pj.attack.is_project_model(lambda variables, images: images)
    assert pj.attack.default_slots(400, 100, 1, "cpu") == 1
    assert pj.attack.default_slots(400, 100, 1, "cpu", project_model=False) == 10
    assert pj.attack.default_slots(400, 4, 1, "cpu", project_model=False) == 4
    assert pj.attack.default_slots(16, 1000, 1, "cpu", project_model=False) == 256
    # Accelerators size the batch by memory, whatever the model.
    assert pj.attack.default_slots(
        400, 1000, 1, "gpu", project_model=False
    ) == pj.attack.default_slots(400, 1000, 1, "gpu")
