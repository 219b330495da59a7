"""The model contract: what any JAX model must be to be attacked, mapped and studied.

A model is a function plus its variables (data, never constants of a program):

    features_fn(variables, images) -> (logits, layers)

- `images`: float32 (N, H, W, C), raw pixel values in 0..255: the attack changes
  pixels, so a model normalises inside.
- Inference mode: deterministic, each image independent of the others in the
  batch (BatchNorm with its running averages, no dropout). The maps run natural and
  perturbed images through one forward pass of their concatenation.
- `logits`: (N, classes) float; their softmax is the model's probabilities.
- `layers`: a `collections.OrderedDict` {name (str): feature maps (N, H, W, K)} in
  forward order (input to output), at least one: the layers whose propagation maps
  are drawn and summarised. An OrderedDict because a plain dict comes back from
  `jax.jit` with its keys sorted, which would silently reorder the layers.
- Hashable (a function, or a frozen dataclass of hashable fields): compiled
  programs are cached on it, and new variables never recompile them.

`check_model(features_fn, variables, image_shape)` checks all of this but inference
mode, abstractly (no FLOPs), with one one-line PropmapsError naming what to change;
it returns {layer: (H, W, K)} in forward order. The map functions check each call's
output the same way while tracing (`call_features`).

The attack and the locality study need only the first half, `apply_fn(variables,
images) -> logits` (`logits_of(features_fn)`, or a function of your own), with
the same images, inference mode and hashability. The attack takes uint8 images
(N, H, W, C), their labels and distinct dataset indices (image i's random numbers
come from its index), and attacks every image it is given: pass the correctly
classified ones.

Adapters:
- Flax linen: `linen_features(module, layers="conv")` records the layers with
  `capture_intermediates` (`nets.layer_outputs`); `layers` is a `LAYER_KINDS` name
  ("conv": every convolution's output; "conv_relu": ReLU of them; "bn_relu": ReLU
  of every BatchNorm output) or a filter `(module, method_name) -> bool` (e.g.
  `nets.is_conv_or_block`). `train=False` is passed where the module's `__call__`
  has a `train` argument. `make_apply_fn(module)` is its logits half.
- A plain function: write `features_fn` directly (tests/lib/test_model_contract.py
  has a CNN of `jax.lax.conv_general_dilated` and a dense layer).
- Flax nnx: split the module once and merge it inside the function, so that its
  state is the variables::

      graphdef, state = nnx.split(model)  # `state` is the variables

      def features_fn(state, images):
          net = nnx.merge(graphdef, state)
          conv1 = net.conv1(images / 255.0)
          conv2 = net.conv2(jax.nn.relu(conv1))
          logits = net.head(jax.nn.relu(conv2).mean(axis=(1, 2)))
          return logits, collections.OrderedDict(conv1=conv1, conv2=conv2)
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from propmaps_jax.errors import PropmapsError
from propmaps_jax.models.nets import is_conv, is_hashable, layer_outputs
from propmaps_jax.types import (
    ApplyFn,
    FeaturesFn,
    Images,
    LayerMaps,
    LogitsFn,
    Variables,
)

LAYER_KINDS = ("conv", "conv_relu", "bn_relu")

FilterFn = Callable[[nn.Module, str], bool] | bool

# What every message about a broken model ends with.
_SEE = "see propmaps_jax.models.contract"


def check_model(
    features_fn: FeaturesFn,
    variables: Variables,
    image_shape: Sequence[int] = (32, 32, 3),
) -> dict[str, tuple[int, ...]]:
    """Check a model against the contract, abstractly (no FLOPs); return its
    {layer: (H, W, K)} in forward order. One PropmapsError says what to change."""
    if not is_hashable(features_fn):
        raise PropmapsError(
            f"a model must be hashable (compiled programs are cached on it), "
            f"{type(features_fn).__name__} is not: use a function or a frozen "
            f"dataclass ({_SEE})"
        )
    batch = 2  # not 1, so that a model that drops the batch axis is caught
    dummy = jax.ShapeDtypeStruct((batch, *image_shape), jnp.float32)
    try:
        _, layers = jax.eval_shape(
            lambda v, x: call_features(features_fn, v, x), variables, dummy
        )
    except PropmapsError:
        raise
    except Exception as error:  # the model's own error, in one line
        first = (str(error).strip().splitlines() or [""])[0]
        raise PropmapsError(
            f"the model fails on float32 images {dummy.shape} with its variables: "
            f"{type(error).__name__}: {first} ({_SEE})"
        ) from error
    return collections.OrderedDict(
        (name, tuple(value.shape[1:])) for name, value in layers.items()
    )


def call_features(
    features_fn: FeaturesFn, variables: Variables, images: Images
) -> tuple[jax.Array, LayerMaps]:
    """(logits, layers) of `features_fn` on float32 `images`, checked against the
    contract (free under `jax.jit`: only shapes are checked, while tracing)."""
    images = jnp.asarray(images, jnp.float32)
    return _check_outputs(features_fn(variables, images), images.shape[0])


def _check_outputs(out: Any, batch: int) -> tuple[Any, LayerMaps]:
    """(logits, layers) of one call on `batch` images, or the PropmapsError that
    says which requirement of the contract they break."""
    if not (isinstance(out, tuple) and len(out) == 2):
        raise PropmapsError(
            f"a model returns (logits, layers), got {type(out).__name__}; return "
            f"the logits and an OrderedDict of feature maps ({_SEE})"
        )
    logits, layers = out
    shape = tuple(getattr(logits, "shape", ()))
    if len(shape) != 2 or shape[0] != batch:
        raise PropmapsError(
            f"a model's logits must be (N, classes), got shape {shape} for N={batch} "
            f"images; return one row of logits per image ({_SEE})"
        )
    if not isinstance(layers, collections.OrderedDict):
        raise PropmapsError(
            f"a model's layers must be a collections.OrderedDict in forward order, "
            f"got {type(layers).__name__} (a plain dict comes back from jax.jit with "
            f"its keys sorted); build them with collections.OrderedDict ({_SEE})"
        )
    if not layers:
        raise PropmapsError(
            "the model gives no layer (for a linen module: its layer kind selects "
            "none, e.g. bn_relu on a model without BatchNorm): choose another "
            f"layer kind or return at least one feature map ({_SEE})"
        )
    for name, value in layers.items():
        shape = tuple(getattr(value, "shape", ()))
        if not isinstance(name, str) or len(shape) != 4 or shape[0] != batch:
            raise PropmapsError(
                f"layer {name!r} has shape {shape} for N={batch} images: each layer "
                "must be named by a string and be feature maps (N, H, W, K); "
                f"reshape it or leave it out ({_SEE})"
            )
    return logits, layers


@dataclasses.dataclass(frozen=True)
class LogitsOf:
    """The logits half of a model: `apply_fn(variables, images) -> logits`."""

    features_fn: FeaturesFn

    def __call__(self, variables: Variables, images: Images) -> jax.Array:
        return self.features_fn(variables, images)[0]


def logits_of(features_fn: FeaturesFn) -> ApplyFn:
    """The attack's `apply_fn` of a model: `make_apply_fn(module)` for a linen
    adapter (so the attack's fast paths for the project's models apply), else its
    logits half (hashable when the model is)."""
    if isinstance(features_fn, LinenFeatures):
        return InferenceApply(features_fn.module, features_fn.takes_train)
    return LogitsOf(features_fn)


def linen_features(module: nn.Module, layers: str | FilterFn = "conv") -> LinenFeatures:
    """The model of a Flax linen module: its logits and the layers `layers` selects
    (a `LAYER_KINDS` name or a `(module, method_name) -> bool` filter)."""
    _layer_selection(layers)  # an unknown kind is refused here, not when traced
    return LinenFeatures(module, layers, _takes_train(module, "linen_features"))


@dataclasses.dataclass(frozen=True)
class LinenFeatures:
    """`features_fn(variables, images) -> (logits, layers)` of a linen module in
    inference mode (`linen_features` builds it; hashable like `InferenceApply`)."""

    module: nn.Module
    layers: str | FilterFn = "conv"
    takes_train: bool = True

    def __call__(
        self, variables: Variables, images: Images
    ) -> tuple[jax.Array, LayerMaps]:
        filter_fn, relu = _layer_selection(self.layers)
        kwargs = {"train": False} if self.takes_train else {}
        logits, layers = layer_outputs(
            self.module,
            variables,
            jnp.asarray(images, jnp.float32),
            filter_fn,
            **kwargs,
        )
        if relu:
            layers = collections.OrderedDict(
                (name, jax.nn.relu(value)) for name, value in layers.items()
            )
        return logits, layers


def _layer_selection(layers: str | FilterFn) -> tuple[FilterFn, bool]:
    """(filter_fn, relu) of a `LAYER_KINDS` name, or (layers, False) of a filter."""
    if not isinstance(layers, str):
        return layers, False
    if layers == "conv":
        return is_conv, False
    if layers == "conv_relu":
        return is_conv, True
    if layers == "bn_relu":
        return is_batch_norm, True
    raise PropmapsError(
        f"unknown layer kind {layers!r}; choose one of: {', '.join(LAYER_KINDS)}"
    )


def is_batch_norm(module: nn.Module, method_name: str) -> bool:
    """Filter of `layer_outputs`: the output of every BatchNorm."""
    return isinstance(module, nn.BatchNorm) and method_name == "__call__"


def make_apply_fn(module: nn.Module) -> ApplyFn:
    """The inference `apply_fn(variables, images) -> logits` of a Flax linen module.

    The module's `__call__` takes the images (float32 (N, H, W, C), 0..255) as its
    one required argument, and `train=False` when it has a `train` argument. Any
    other model (an nnx module, a plain function) enters the library as its own
    `apply_fn(variables, images) -> logits`; a PropmapsError says so.
    """
    return InferenceApply(module, _takes_train(module))


@dataclasses.dataclass(frozen=True)
class InferenceApply:
    """`apply_fn(variables, images) -> logits` of a module in inference mode.

    A model is this function plus its variables, passed as data: compiled programs
    that take an `InferenceApply` are cached on the module (equal modules compare
    equal), so new weights never recompile them. `train=False` is passed when the
    module's `__call__` has a `train` argument (`make_apply_fn` finds out).
    """

    module: nn.Module
    takes_train: bool = True

    def __call__(self, variables: Variables, images: Images) -> jax.Array:
        kwargs = {"train": False} if self.takes_train else {}
        return self.module.apply(variables, jnp.asarray(images, jnp.float32), **kwargs)


def _takes_train(module: nn.Module, caller: str = "make_apply_fn") -> bool:
    """Whether `module.__call__` has a `train` argument; PropmapsError (naming
    `caller`) when it cannot be called on images alone."""
    other = (
        "write apply_fn(variables, images) -> logits for it instead"
        if caller == "make_apply_fn"
        else "write features_fn(variables, images) -> (logits, layers) for it instead"
    )
    if not isinstance(module, nn.Module):
        raise PropmapsError(
            f"{caller} takes a flax.linen Module, got {type(module).__name__}; {other}"
        )
    name = type(module).__name__
    try:
        parameters = inspect.signature(module.__call__).parameters
    except (AttributeError, TypeError, ValueError):
        raise PropmapsError(
            f"{caller} needs a module with a __call__ method; {name} has none "
            f"usable: define __call__(self, images) or {other}"
        ) from None
    params = list(parameters.values())
    positional = (
        inspect.Parameter.POSITIONAL_ONLY,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
    )
    takes_images = bool(params) and (
        params[0].kind in positional or params[0].kind is params[0].VAR_POSITIONAL
    )
    required = [
        p.name
        for p in params[takes_images:]
        if p.default is p.empty
        and p.name != "train"
        and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    if not takes_images or required:
        raise PropmapsError(
            f"{caller} calls {name}(images) (with train=False where __call__ "
            f"has `train`), but its __call__ takes ({', '.join(parameters)}): give "
            f"it the images as first argument and defaults to the others, or {other}"
        )
    return "train" in parameters


def make_logits_fn(module: nn.Module, variables: Variables) -> LogitsFn:
    """A closure images -> logits (inference) for one-off calls in scripts and tests.

    One compiled program per module and image shape, shared by every closure of an
    equal module (op by op, a LeNet forward would compile about 15); a module that
    cannot key that cache (a list attribute) runs op by op. The library's engines
    take `apply_fn` and `variables` instead (see `make_apply_fn`), so that weights
    are data, not constants of the program.
    """
    apply_fn = make_apply_fn(module)
    if not is_hashable(apply_fn):
        return lambda images: apply_fn(variables, images)
    return lambda images: _compiled_apply(apply_fn, variables, images)


@functools.partial(jax.jit, static_argnums=0)
def _compiled_apply(apply_fn: ApplyFn, variables: Variables, images: Images):
    return apply_fn(variables, images)
