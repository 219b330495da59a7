"""Flax (linen) models for CIFAR-10 and the one helper that returns their feature maps.

Every model takes raw pixels (float, 0..255, NHWC) and normalises inside with the
per-channel constants of its `ModelConfig`, so that attacks work in pixel space.
Models return logits; `jax.nn.softmax` of them matches the Keras models' softmax.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import serialization

from propmaps_jax import backend
from propmaps_jax.errors import PropmapsError, WeightsError
from propmaps_jax.models.column_pair import ColumnPairConv
from propmaps_jax.types import Images, LayerMaps, Variables

# Normalisation of the public Keras models (one-pixel-attack-keras): x in 0..255.
CIFAR10_MEAN = (125.307, 122.95, 113.865)
CIFAR10_STD = (62.9932, 62.0887, 66.7048)
CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)


def normalize(images: Images, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
    """(x - mean) / std per channel, computed in float32."""
    images = jnp.asarray(images, jnp.float32)
    return (images - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


# The seed of `lenet_perm`'s one fixed pixel permutation (`pixel_permutation`).
PERMUTATION_SEED = 0


def pixel_permutation(seed: int, height: int = 32, width: int = 32) -> np.ndarray:
    """A fixed, seeded permutation of the H*W pixel positions (int32 (H*W,)).

    Network input position j (row-major) holds the image's pixel `perm[j]`; a pixel
    keeps its three channels together, so a one-pixel change of the image is a
    one-pixel change of the network's input, at another position.
    """
    rng = np.random.Generator(np.random.PCG64(seed))
    return rng.permutation(height * width).astype(np.int32)


def check_permutation(permutation: Sequence[int], positions: int, where: str) -> None:
    """A WeightsError unless `permutation` is a permutation of range(positions)."""
    perm = np.asarray(permutation)
    if perm.ndim != 1 or perm.size != positions or perm.dtype.kind not in "iu":
        raise WeightsError(
            f"{where}: the pixel permutation must be {positions} integers, got "
            f"shape {perm.shape} of {perm.dtype}"
        )
    if not np.array_equal(np.sort(perm), np.arange(positions)):
        raise WeightsError(
            f"{where}: the pixel permutation is not one of 0..{positions - 1} "
            f"({positions - np.unique(perm).size} repeated positions or values out "
            "of range); re-create the checkpoint"
        )


def inverse_permutation(permutation: Sequence[int]) -> np.ndarray:
    """inv with inv[perm[j]] = j: the network position of each image pixel."""
    perm = np.asarray(permutation, np.int64)
    inverse = np.empty_like(perm)
    inverse[perm] = np.arange(perm.size)
    return inverse.astype(np.int32)


def permute_pixels(x: jax.Array, permutation: Sequence[int]) -> jax.Array:
    """(N, H, W, C) images in the network's order: out[:, j] = x[:, perm[j]]
    (positions row-major)."""
    n, height, width, channels = x.shape
    flat = x.reshape(n, height * width, channels)
    perm = jnp.asarray(np.asarray(permutation, np.int32))
    return jnp.take(flat, perm, axis=1).reshape(n, height, width, channels)


class LeNet(nn.Module):
    """The paper's LeNet: Conv 6@5x5, pool, Conv 16@5x5, pool, Dense 120, 84, 10.

    `kernel_sizes` changes the convolutions' kernels (`lenet_k3`, `lenet_k7`: the
    first one 3x3 or 7x7). With a `permutation` (`lenet_perm`), the normalised
    image's pixel positions are shuffled by it before the first layer
    (`permute_pixels`): the model still takes ordinary images, so attacks and
    studies work in image coordinates, but its receptive fields are local in the
    network's coordinates and scattered in the image's.
    """

    num_classes: int = 10
    mean: Sequence[float] = CIFAR10_MEAN
    std: Sequence[float] = CIFAR10_STD
    features: Sequence[int] = (6, 16)
    hidden: Sequence[int] = (120, 84)
    kernel_sizes: Sequence[int] = (5, 5)
    permutation: tuple[int, ...] | None = None
    dtype: Any = jnp.float32
    # The first convolution as `ColumnPairConv` (same parameters, same sums): True,
    # False, or None for `backend.enabled("column_pair_conv")` on the default
    # backend (on where measured faster: CPU).
    column_pairs: bool | None = None

    @nn.compact
    def __call__(self, images: Images, train: bool = False) -> jax.Array:
        x = normalize(images, self.mean, self.std).astype(self.dtype)
        if self.permutation is not None:
            x = permute_pixels(x, self.permutation)
        pairs = self.column_pairs
        if pairs is None:
            pairs = backend.enabled("column_pair_conv")
        for i, (width, k) in enumerate(
            zip(self.features, self.kernel_sizes, strict=True)
        ):
            conv = ColumnPairConv if i == 0 and pairs else nn.Conv
            x = conv(
                width, (k, k), padding="VALID", dtype=self.dtype, name=f"conv{i + 1}"
            )(x)
            x = nn.relu(x)
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
        # (H, W, C) flatten order, as Keras' Flatten with channels_last.
        x = x.reshape((x.shape[0], -1))
        for i, width in enumerate(self.hidden):
            x = nn.relu(nn.Dense(width, dtype=self.dtype, name=f"fc{i + 1}")(x))
        x = nn.Dense(self.num_classes, dtype=self.dtype, name="logits")(x)
        return x.astype(jnp.float32)


def _batch_norm(train: bool, dtype: Any, name: str) -> nn.BatchNorm:
    # Keras defaults of the reference models: momentum 0.99, epsilon 1e-3.
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=0.99,
        epsilon=1e-3,
        dtype=dtype,
        name=name,
    )


class PreActBlock(nn.Module):
    """Pre-activation residual block: BN, ReLU, Conv, BN, ReLU, Conv, + shortcut."""

    features: int
    strides: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        y = nn.relu(_batch_norm(train, self.dtype, "bn1")(x))
        y = nn.Conv(
            self.features,
            (3, 3),
            strides=self.strides,
            padding="SAME",
            dtype=self.dtype,
            name="conv1",
        )(y)
        y = nn.relu(_batch_norm(train, self.dtype, "bn2")(y))
        y = nn.Conv(
            self.features, (3, 3), padding="SAME", dtype=self.dtype, name="conv2"
        )(y)
        if self.strides != 1 or x.shape[-1] != self.features:
            # Projection of the block input (not its activation), as in Keras.
            x = nn.Conv(
                self.features,
                (1, 1),
                strides=self.strides,
                padding="SAME",
                dtype=self.dtype,
                name="shortcut",
            )(x)
        return x + y


class ResNet(nn.Module):
    """Pre-activation ResNet for CIFAR-10, depth 6 * blocks_per_stage + 2."""

    blocks_per_stage: int = 5
    widths: Sequence[int] = (16, 32, 64)
    num_classes: int = 10
    mean: Sequence[float] = CIFAR10_MEAN
    std: Sequence[float] = CIFAR10_STD
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: Images, train: bool = False) -> jax.Array:
        x = normalize(images, self.mean, self.std).astype(self.dtype)
        x = nn.Conv(
            self.widths[0], (3, 3), padding="SAME", dtype=self.dtype, name="stem"
        )(x)
        for stage, width in enumerate(self.widths):
            for block in range(self.blocks_per_stage):
                strides = 2 if stage > 0 and block == 0 else 1
                x = PreActBlock(
                    width,
                    strides,
                    dtype=self.dtype,
                    name=f"stage{stage + 1}_block{block + 1}",
                )(x, train)
        x = nn.relu(_batch_norm(train, self.dtype, "bn_final")(x))
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dense(self.num_classes, dtype=self.dtype, name="logits")(x)
        return x.astype(jnp.float32)


class MLP(nn.Module):
    """A fully connected network (no convolution): flatten, Dense 1024, 512, 10.

    No receptive-field geometry at all: every first-layer unit sees every pixel, so
    whatever locality it shows comes from what training learns, not from its wiring.
    """

    num_classes: int = 10
    mean: Sequence[float] = CIFAR10_MEAN
    std: Sequence[float] = CIFAR10_STD
    hidden: Sequence[int] = (1024, 512)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: Images, train: bool = False) -> jax.Array:
        x = normalize(images, self.mean, self.std).astype(self.dtype)
        x = x.reshape((x.shape[0], -1))  # (H, W, C) order
        for i, width in enumerate(self.hidden):
            x = nn.relu(nn.Dense(width, dtype=self.dtype, name=f"fc{i + 1}")(x))
        x = nn.Dense(self.num_classes, dtype=self.dtype, name="logits")(x)
        return x.astype(jnp.float32)


ResNet32 = functools.partial(ResNet, blocks_per_stage=5)
ResNet20 = functools.partial(ResNet, blocks_per_stage=3)
ResNetTiny = functools.partial(ResNet, blocks_per_stage=1, widths=(4, 8, 8))
LeNetTiny = functools.partial(LeNet, features=(3, 4), hidden=(16,))
LeNetK3 = functools.partial(LeNet, kernel_sizes=(3, 5))
LeNetK7 = functools.partial(LeNet, kernel_sizes=(7, 5))
MLPTiny = functools.partial(MLP, hidden=(16,))

# Architectures by name. "resnet" is the paper's (and the Keras model's) ResNet-32.
MODEL_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "lenet": LeNet,
    "resnet": ResNet32,
    "resnet20": ResNet20,
    "lenet_tiny": LeNetTiny,
    "resnet_tiny": ResNetTiny,
    # The receptive-field / image-content study (analysis/readings.py).
    "lenet_perm": LeNet,
    "lenet_k3": LeNetK3,
    "lenet_k7": LeNetK7,
    "mlp": MLP,
    "mlp_tiny": MLPTiny,
    "lenet_perm_tiny": LeNetTiny,
}
# Models whose config carries a pixel permutation (`pixel_permutation`).
PERMUTED_MODELS = frozenset({"lenet_perm", "lenet_perm_tiny"})


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """What is needed to rebuild a model: architecture name and normalisation."""

    name: str
    mean: tuple[float, ...] = CIFAR10_MEAN
    std: tuple[float, ...] = CIFAR10_STD
    num_classes: int = 10
    image_shape: tuple[int, int, int] = (32, 32, 3)
    # The pixel permutation of a permuted model (PERMUTED_MODELS), else None.
    permutation: tuple[int, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {
            "name": self.name,
            "mean": list(self.mean),
            "std": list(self.std),
            "num_classes": self.num_classes,
            "image_shape": list(self.image_shape),
        }
        if self.permutation is not None:  # absent for the others: configs unchanged
            out["permutation"] = list(self.permutation)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        permutation = data.get("permutation")
        if permutation is not None:
            shape = tuple(int(v) for v in data["image_shape"])
            check_permutation(permutation, shape[0] * shape[1], "the model config")
            permutation = tuple(int(v) for v in permutation)
        return cls(
            name=str(data["name"]),
            mean=tuple(float(v) for v in data["mean"]),
            std=tuple(float(v) for v in data["std"]),
            num_classes=int(data["num_classes"]),
            image_shape=tuple(int(v) for v in data["image_shape"]),
            permutation=permutation,
        )


def default_config(name: str) -> ModelConfig:
    """A registry model's config with default normalisation; a permuted model
    gets the project's one fixed permutation (`PERMUTATION_SEED`)."""
    if name not in PERMUTED_MODELS:
        return ModelConfig(name)
    height, width = ModelConfig(name).image_shape[:2]
    perm = pixel_permutation(PERMUTATION_SEED, height, width)
    return ModelConfig(name, permutation=tuple(int(v) for v in perm))


def create_model(config: ModelConfig | str, dtype: Any = jnp.float32) -> nn.Module:
    """The Flax module for a config (or a registry name with default normalisation)."""
    if isinstance(config, str):
        config = default_config(config)
    if config.name not in MODEL_REGISTRY:
        raise PropmapsError(
            f"unknown model {config.name!r}; choose one of {', '.join(MODEL_REGISTRY)}"
        )
    extra = {}
    if config.name in PERMUTED_MODELS:
        if config.permutation is None:
            raise PropmapsError(
                f"model {config.name!r} needs its pixel permutation: load it from "
                "its checkpoint, or build its config with models.default_config"
            )
        height, width = config.image_shape[:2]
        check_permutation(config.permutation, height * width, f"model {config.name}")
        extra["permutation"] = tuple(config.permutation)
    elif config.permutation is not None:
        raise PropmapsError(
            f"model {config.name!r} takes no pixel permutation; the permuted models "
            f"are {', '.join(sorted(PERMUTED_MODELS))}"
        )
    return MODEL_REGISTRY[config.name](
        num_classes=config.num_classes,
        mean=config.mean,
        std=config.std,
        dtype=dtype,
        **extra,
    )


def for_platform(module: nn.Module, platform: str) -> nn.Module:
    """`module` with its backend choices (`backend.CHOICES`) fixed for `platform`,
    e.g. to lower for a TPU from a CPU; the parameters stay the same."""
    if isinstance(module, LeNet):
        return module.clone(column_pairs=backend.enabled("column_pair_conv", platform))
    return module


def init_variables(
    module: nn.Module, key: jax.Array, image_shape: Sequence[int] = (32, 32, 3)
) -> Variables:
    """Fresh variables ({"params", and "batch_stats" for BatchNorm models})."""
    image_shape = tuple(image_shape)
    if not is_hashable(module):  # a module with list attributes: traced each call
        return _init.__wrapped__(module, key, image_shape)
    return _init(module, key, image_shape)


def is_hashable(value: Any) -> bool:
    """Whether `value` can key a cache (a static argument of a jitted function)."""
    try:
        hash(value)
    except TypeError:
        return False
    return True


@functools.partial(jax.jit, static_argnums=(0, 2))
def _init(module: nn.Module, key: jax.Array, image_shape: tuple[int, ...]) -> Variables:
    # One program per (module, image shape), traced once per process: linen
    # modules are frozen dataclasses, equal when their settings are.
    return module.init(key, jnp.zeros((1, *image_shape), jnp.float32), train=False)


def count_params(variables: Variables) -> int:
    """Number of trainable parameters."""
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(variables["params"]))


def is_conv(module: nn.Module, method_name: str) -> bool:
    """Default filter of `layer_outputs`: the output of every convolution."""
    return isinstance(module, nn.Conv) and method_name == "__call__"


def is_conv_or_block(module: nn.Module, method_name: str) -> bool:
    """Filter of `layer_outputs`: every convolution and every residual block's output.

    A block's output is the residual stream after the block (shortcut + branch).
    """
    return method_name == "__call__" and isinstance(module, nn.Conv | PreActBlock)


def _flatten_intermediates(tree: dict, prefix: tuple[str, ...], out: dict) -> None:
    for key, value in tree.items():
        if isinstance(value, dict):
            _flatten_intermediates(value, prefix + (key,), out)
            continue
        # A leaf is the tuple of values sown by one method of one module.
        parts = prefix if key == "__call__" else prefix + (key,)
        name = "/".join(parts) or "output"
        values = tuple(value)
        if len(values) == 1:
            out[name] = values[0]
        else:  # a module called several times: one entry per call
            for i, v in enumerate(values):
                out[f"{name}#{i}"] = v


def layer_outputs(
    module: nn.Module,
    variables: Variables,
    images: Images,
    filter_fn: Callable[[nn.Module, str], bool] | bool = is_conv,
    **apply_kwargs: Any,
) -> tuple[jax.Array, LayerMaps]:
    """Run any Flax linen module: (output, {layer_name: layer output}), forward order.

    Uses Flax's `capture_intermediates`; names are the module paths joined by "/"
    (e.g. "stage2_block1/conv1"). `filter_fn(module, method_name)` selects what is
    recorded: by default the output of every `nn.Conv` (`is_conv_or_block` adds the
    residual stream after each block); `True` records every submodule. Extra keyword
    arguments go to `module.apply` (e.g. `train=False`).

    The layers are an `OrderedDict`, a pytree whose order survives `jax.jit` (a
    plain dict comes back from `jit` with its keys sorted).
    """
    output, state = module.apply(
        variables,
        images,
        capture_intermediates=filter_fn,
        mutable=["intermediates"],
        **apply_kwargs,
    )
    layers: LayerMaps = collections.OrderedDict()
    _flatten_intermediates(dict(state.get("intermediates", {})), (), layers)
    layers.pop("output", None)  # the root's own output is returned separately
    return output, layers


def check_variables_fit(
    template: Variables, variables: Variables, where: str
) -> Variables:
    """Restore `variables` into the structure of `template`, checking every shape."""
    flat_t = {
        jax.tree_util.keystr(k): v
        for k, v in jax.tree_util.tree_leaves_with_path(template)
    }
    flat_v = {
        jax.tree_util.keystr(k): v
        for k, v in jax.tree_util.tree_leaves_with_path(variables)
    }
    missing = sorted(set(flat_t) - set(flat_v))
    extra = sorted(set(flat_v) - set(flat_t))
    if missing or extra:
        raise WeightsError(
            f"{where} does not fit the model: "
            + (
                f"missing {missing[:3]}{'...' if len(missing) > 3 else ''} "
                if missing
                else ""
            )
            + (
                f"unexpected {extra[:3]}{'...' if len(extra) > 3 else ''}"
                if extra
                else ""
            )
        )
    for k, t in flat_t.items():
        if tuple(np.shape(flat_v[k])) != tuple(t.shape):
            raise WeightsError(
                f"{where} does not fit the model: {k} has shape "
                f"{tuple(np.shape(flat_v[k]))}, the model expects {tuple(t.shape)}"
            )
    return jax.tree_util.tree_map(
        lambda t, v: np.asarray(v, dtype=t.dtype),
        template,
        serialization.from_state_dict(template, variables),
    )


def variables_template(config: ModelConfig) -> Variables:
    """Shapes and dtypes of a model's variables, without compiling or running it."""
    template = (
        _template(config) if is_hashable(config) else _template.__wrapped__(config)
    )
    # A fresh copy of the containers: callers may change what they are given.
    return jax.tree_util.tree_map(lambda t: t, template)


@functools.cache
def _template(config: ModelConfig) -> Variables:
    # Traced once per process and model (ModelConfig is frozen, so hashable).
    module = create_model(config)
    dummy = jnp.zeros((1, *config.image_shape), jnp.float32)
    return jax.eval_shape(lambda: module.init(jax.random.key(0), dummy, train=False))
