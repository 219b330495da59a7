"""An exact forward of one-pixel candidates that computes only what the pixel reaches.

A candidate of the one-pixel attack is the clean image with one pixel replaced. In
the first layers of a convolutional network only the receptive field of that pixel
changes: the output of a 5x5 convolution differs from the clean image's in a 5x5
window, the next layer's in a window a little larger, and so on until the window
covers the whole map. `make_candidate_forward` builds a forward that computes the
clean image's activations once per image, then per candidate only a statically
sized window of each early layer's output, placed around the changed pixel
(`lax.dynamic_slice`, clamped at the edges), and switches to the full computation
from the first layer whose window covers (a chosen fraction of) its map. The
logits equal the full forward's up to float rounding (tested to 1e-5).

How a window is found. Along each axis, a tensor's *span* is the interval of
positions that may differ from the clean tensor. A pixel at row r has span [r, r];
a convolution with kernel K, stride s and low padding p maps a span [lo, hi] to
[ceil((lo + p - K + 1) / s), floor((hi + p) / s)] (clipped to the output), an
elementwise layer keeps it, a residual sum takes the hull of its operands'. The
window of a tensor has the largest span length over every pixel position (computed
at trace time by running the same span arithmetic on NumPy arrays of all positions)
and starts at the span's start, clamped so the window stays inside the map. To
compute a layer's window, the input region it reads (padding included: the zero
padding of a SAME convolution is zero in the convolution's input space, e.g. after
the model's normalisation) is cut from the clean input, the input's window is
written over it, and the layer runs on the region with VALID padding.

Supported: `models.LeNet` and `models.ResNet` (any widths, depths and
normalisation), float32, one pixel per candidate. Anything else gets None: the
caller keeps the plain forward.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from propmaps_jax import models
from propmaps_jax.errors import PropmapsError
from propmaps_jax.models import nets
from propmaps_jax.types import Images, Perturbation, Variables

# A layer whose window covers this fraction of its map is computed whole: the
# windows' gathers then cost more than the multiply-adds they save (measured on
# CPU, ResNet-32 at S x P = 1 x 400 and 4 x 400: about 1.45x the plain forward's
# candidates per CPU-second at 0.7, 1.3x at 1.0; LeNet's windows never reach it).
DENSIFY_FRACTION = 0.7


def _int32_index(*index: Any) -> tuple[jax.Array, ...]:
    """A dynamic_slice start of one dtype, also with jax_enable_x64 on."""
    return tuple(jnp.asarray(i, jnp.int32) for i in index)


def _ceil_div(x: Any, d: int) -> Any:
    return -((-x) // d)


@dataclasses.dataclass(frozen=True)
class _Span:
    """Positions along one axis that may differ from the clean tensor.

    `lo`, `hi`: this candidate's span (traced int32); `lo_all`, `hi_all`: the span
    for every position of the changed pixel along this axis (NumPy, static), from
    which the window's static length is taken.
    """

    lo: Any
    hi: Any
    lo_all: np.ndarray
    hi_all: np.ndarray
    size: int  # the map's size along this axis

    @property
    def length(self) -> int:
        """Static window length: the longest span, at least 1, at most the map."""
        return int(min(self.size, max(1, np.max(self.hi_all - self.lo_all + 1))))

    def start(self) -> Any:
        return jnp.clip(self.lo, 0, self.size - self.length)

    def start_all(self) -> np.ndarray:
        return np.clip(self.lo_all, 0, self.size - self.length)

    def through(self, kernel: int, stride: int, pad_lo: int, out_size: int) -> _Span:
        """The span of a windowed layer's output (kernel, stride, low padding)."""

        def lo_of(lo, xp):
            return xp.clip(_ceil_div(lo + pad_lo - kernel + 1, stride), 0, out_size - 1)

        def hi_of(hi, xp):
            return xp.clip((hi + pad_lo) // stride, 0, out_size - 1)

        return _Span(
            lo_of(self.lo, jnp),
            hi_of(self.hi, jnp),
            lo_of(self.lo_all, np),
            hi_of(self.hi_all, np),
            out_size,
        )

    def hull(self, other: _Span) -> _Span:
        return _Span(
            jnp.minimum(self.lo, other.lo),
            jnp.maximum(self.hi, other.hi),
            np.minimum(self.lo_all, other.lo_all),
            np.maximum(self.hi_all, other.hi_all),
            self.size,
        )


@dataclasses.dataclass(frozen=True)
class _Window:
    """A candidate's tensor: the clean tensor except on a window.

    values (1, h, w, C) are the candidate's values on the window at
    (rows.start(), cols.start()); `clean` (H, W, C) is the clean image's tensor.
    """

    values: jax.Array
    rows: _Span
    cols: _Span
    clean: jax.Array


def _overlay(
    region: jax.Array,
    window: _Window,
    d_rows: Any,
    d_cols: Any,
    d_rows_all: np.ndarray,
    d_cols_all: np.ndarray,
) -> jax.Array:
    """`region` (1, R, Q, C) with the window's values written at offset (d_rows,
    d_cols) (its part inside the region; the offsets' every value in *_all)."""
    _, big_r, big_q, _ = region.shape
    _, h, w, channels = window.values.shape
    # Shift the window into the region's frame with zero margins just wide enough
    # for every offset, then select. The window may stick out of the region (a 1x1
    # stride-2 convolution reads every other row). Measured on CPU, this gather
    # and select is faster than a dynamic_update_slice, which vmap makes a scatter.
    front_r, front_q = max(0, int(d_rows_all.max())), max(0, int(d_cols_all.max()))
    back_r = max(0, big_r - h - int(d_rows_all.min()))
    back_q = max(0, big_q - w - int(d_cols_all.min()))
    padded = jnp.pad(
        window.values, ((0, 0), (front_r, back_r), (front_q, back_q), (0, 0))
    )
    shifted = jax.lax.dynamic_slice(
        padded,
        _int32_index(0, front_r - d_rows, front_q - d_cols, 0),
        (1, big_r, big_q, channels),
    )
    rows = jnp.arange(big_r)[:, None]
    cols = jnp.arange(big_q)[None, :]
    mask = (
        (rows >= d_rows) & (rows < d_rows + h) & (cols >= d_cols) & (cols < d_cols + w)
    )
    return jnp.where(mask[None, :, :, None], shifted, region)


def _materialize(
    window: _Window,
    pad: tuple[tuple[int, int], tuple[int, int]],
    start_rows: Any,
    start_cols: Any,
    start_rows_all: np.ndarray,
    start_cols_all: np.ndarray,
    size: tuple[int, int],
) -> jax.Array:
    """The candidate's tensor, zero padded by `pad`, on a region (1, *size, C) that
    starts at (start_rows, start_cols) in padded coordinates."""
    clean = window.clean
    if any(p for pair in pad for p in pair):
        clean = jnp.pad(clean, (*pad, (0, 0)))
    channels = clean.shape[-1]
    if size == clean.shape[:2]:
        region = clean[None]
    else:
        region = jax.lax.dynamic_slice(
            clean, _int32_index(start_rows, start_cols, 0), (*size, channels)
        )[None]
    shift_r, shift_c = pad[0][0], pad[1][0]
    return _overlay(
        region,
        window,
        window.rows.start() + shift_r - start_rows,
        window.cols.start() + shift_c - start_cols,
        window.rows.start_all() + shift_r - start_rows_all,
        window.cols.start_all() + shift_c - start_cols_all,
    )


def _full(window: _Window) -> jax.Array:
    """The candidate's whole tensor (1, H, W, C)."""
    zeros = np.zeros(1, np.int64)
    return _materialize(
        window, ((0, 0), (0, 0)), 0, 0, zeros, zeros, window.clean.shape[:2]
    )


def _same_or_valid_pads(
    padding: str, size: int, kernel: int, stride: int
) -> tuple[int, int, int]:
    """(pad_lo, pad_hi, out_size) of a convolution along one axis."""
    if padding == "VALID":
        return 0, 0, (size - kernel) // stride + 1
    out = _ceil_div(size, stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2, out


class _Counter:
    """Multiply-adds counted at trace time: per image (clean) and per candidate."""

    def __init__(self) -> None:
        self.per_image = 0
        self.per_candidate = 0
        self.per_candidate_windowed = 0


class _DenseOps:
    """The model's layers on whole maps (batch, H, W, C), each output recorded."""

    def __init__(self, variables: Variables, dtype: Any, counter: _Counter | None):
        self.variables = variables
        self.dtype = dtype
        self.counter = counter
        self.record: list[jax.Array] = []

    def _out(self, x: jax.Array) -> jax.Array:
        self.record.append(x)
        return x

    def _count(self, macs: int) -> None:
        if self.counter is not None:
            self.counter.per_image += macs

    def input(
        self, images: jax.Array, mean: Any, std: Any, permutation: Any = None
    ) -> jax.Array:
        x = models.normalize(images, mean, std).astype(self.dtype)
        if permutation is not None:
            x = nets.permute_pixels(x, permutation)
        return self._out(x)

    def conv(self, x, path, features, kernel, stride, padding):
        params = _subtree(self.variables["params"], path)
        y = nn.Conv(
            features,
            (kernel, kernel),
            strides=stride,
            padding=padding,
            dtype=self.dtype,
        ).apply({"params": params}, x)
        self._count(int(np.prod(y.shape[1:])) * kernel * kernel * x.shape[-1])
        return self._out(y)

    def elementwise(self, fn, x):
        return self._out(fn(x))

    def max_pool(self, x, size):
        return self._out(nn.max_pool(x, (size, size), strides=(size, size)))

    def add(self, x, y):
        return self._out(x + y)

    def head(self, x, fn, macs):
        self._count(macs)
        return self._out(fn(x))


class _WindowOps:
    """The same layers for one candidate: windows over the clean tensors."""

    def __init__(
        self,
        variables: Variables,
        dtype: Any,
        clean: list[jax.Array],
        pixel: jax.Array,
        densify_fraction: float,
        counter: _Counter | None,
    ):
        self.variables = variables
        self.dtype = dtype
        self.clean = clean
        self.pixel = pixel
        self.densify_fraction = densify_fraction
        self.counter = counter
        self.at = 0

    def _clean(self) -> jax.Array:
        out = self.clean[self.at]
        self.at += 1
        return out

    def _count(self, macs: int, windowed: bool) -> None:
        if self.counter is not None:
            self.counter.per_candidate += macs
            if windowed:
                self.counter.per_candidate_windowed += macs

    def input(self, images: jax.Array, mean: Any, std: Any, permutation: Any = None):
        clean = self._clean()
        height, width = clean.shape[:2]
        row, col = self.pixel[0], self.pixel[1]
        if permutation is not None:  # the pixel's position in the network's input
            flat = jnp.asarray(nets.inverse_permutation(permutation))[row * width + col]
            row, col = flat // width, flat % width
        colour = self.pixel[2:5].astype(jnp.float32).reshape(1, 1, 1, 3)
        values = models.normalize(colour, mean, std).astype(self.dtype)
        rows, cols = np.arange(height), np.arange(width)
        return _Window(
            values,
            _Span(row, row, rows, rows, height),
            _Span(col, col, cols, cols, width),
            clean,
        )

    def _windowed(self, x, kernel, stride, padding, layer, macs_per_output):
        """A layer that reads (kernel x kernel, stride) windows of its input."""
        clean_out = self._clean()
        if not isinstance(x, _Window):
            self._count(int(np.prod(clean_out.shape)) * macs_per_output, False)
            return layer(x, padding)
        height, width = x.clean.shape[:2]
        pr_lo, pr_hi, out_h = _same_or_valid_pads(padding, height, kernel, stride)
        pc_lo, pc_hi, out_w = _same_or_valid_pads(padding, width, kernel, stride)
        rows = x.rows.through(kernel, stride, pr_lo, out_h)
        cols = x.cols.through(kernel, stride, pc_lo, out_w)
        area = rows.length * cols.length
        if area >= self.densify_fraction * out_h * out_w:
            self._count(int(np.prod(clean_out.shape)) * macs_per_output, False)
            return layer(_full(x), padding)
        region_size = (
            (rows.length - 1) * stride + kernel,
            (cols.length - 1) * stride + kernel,
        )
        region = _materialize(
            x,
            ((pr_lo, pr_hi), (pc_lo, pc_hi)),
            rows.start() * stride,
            cols.start() * stride,
            rows.start_all() * stride,
            cols.start_all() * stride,
            region_size,
        )
        values = layer(region, "VALID")
        self._count(area * clean_out.shape[-1] * macs_per_output, True)
        return _Window(values, rows, cols, clean_out)

    def conv(self, x, path, features, kernel, stride, padding):
        params = _subtree(self.variables["params"], path)

        def layer(region, pad):
            return nn.Conv(
                features,
                (kernel, kernel),
                strides=stride,
                padding=pad,
                dtype=self.dtype,
            ).apply({"params": params}, region)

        channels = (x.clean if isinstance(x, _Window) else x).shape[-1]
        return self._windowed(
            x, kernel, stride, padding, layer, kernel * kernel * channels
        )

    def max_pool(self, x, size):
        def layer(region, pad):
            return nn.max_pool(region, (size, size), strides=(size, size), padding=pad)

        return self._windowed(x, size, size, "VALID", layer, 0)

    def elementwise(self, fn, x):
        clean_out = self._clean()
        if not isinstance(x, _Window):
            return fn(x)
        return _Window(fn(x.values), x.rows, x.cols, clean_out)

    def add(self, x, y):
        clean_out = self._clean()
        if not (isinstance(x, _Window) and isinstance(y, _Window)):
            as_full = [_full(t) if isinstance(t, _Window) else t for t in (x, y)]
            return as_full[0] + as_full[1]
        rows, cols = x.rows.hull(y.rows), x.cols.hull(y.cols)
        size = (rows.length, cols.length)
        start = (rows.start(), cols.start(), rows.start_all(), cols.start_all())
        no_pad = ((0, 0), (0, 0))
        values = _materialize(x, no_pad, *start, size) + _materialize(
            y, no_pad, *start, size
        )
        return _Window(values, rows, cols, clean_out)

    def head(self, x, fn, macs):
        self._clean()
        self._count(macs, False)
        return fn(_full(x) if isinstance(x, _Window) else x)


def _subtree(tree: Any, path: tuple[str, ...]) -> Any:
    for name in path:
        tree = tree[name]
    return tree


def _lenet_graph(ops, module: models.LeNet, variables: Variables, images):
    """LeNet's layers (models.LeNet, any kernels, pixel permutation or not) as ops:
    convolutions, ReLU, pooling, head."""
    x = ops.input(images, module.mean, module.std, module.permutation)
    for i, (width, k) in enumerate(
        zip(module.features, module.kernel_sizes, strict=True)
    ):
        x = ops.conv(x, (f"conv{i + 1}",), width, k, 1, "VALID")
        x = ops.elementwise(nn.relu, x)
        x = ops.max_pool(x, 2)
    params = variables["params"]
    dims = [int(np.prod(x.clean.shape if isinstance(x, _Window) else x.shape[1:]))]
    dims += [*module.hidden, module.num_classes]

    def head(x):
        x = x.reshape((x.shape[0], -1))
        for i, width in enumerate(module.hidden):
            layer = nn.Dense(width, dtype=module.dtype)
            x = nn.relu(layer.apply({"params": params[f"fc{i + 1}"]}, x))
        layer = nn.Dense(module.num_classes, dtype=module.dtype)
        return layer.apply({"params": params["logits"]}, x).astype(jnp.float32)

    return ops.head(
        x, head, sum(a * b for a, b in zip(dims[:-1], dims[1:], strict=True))
    )


def _resnet_graph(ops, module: models.ResNet, variables: Variables, images):
    """The pre-activation ResNet's layers (models.ResNet / PreActBlock) as ops."""
    params, stats = variables["params"], variables["batch_stats"]

    def bn_relu(path: tuple[str, ...]) -> Callable[[jax.Array], jax.Array]:
        norm = nets._batch_norm(False, module.dtype, path[-1])
        bn_vars = {
            "params": _subtree(params, path),
            "batch_stats": _subtree(stats, path),
        }
        return lambda x: nn.relu(norm.apply(bn_vars, x))

    x = ops.input(images, module.mean, module.std)
    x = ops.conv(x, ("stem",), module.widths[0], 3, 1, "SAME")
    channels = module.widths[0]
    for stage, width in enumerate(module.widths):
        for block in range(module.blocks_per_stage):
            name = f"stage{stage + 1}_block{block + 1}"
            strides = 2 if stage > 0 and block == 0 else 1
            y = ops.elementwise(bn_relu((name, "bn1")), x)
            y = ops.conv(y, (name, "conv1"), width, 3, strides, "SAME")
            y = ops.elementwise(bn_relu((name, "bn2")), y)
            y = ops.conv(y, (name, "conv2"), width, 3, 1, "SAME")
            if strides != 1 or channels != width:
                x = ops.conv(x, (name, "shortcut"), width, 1, strides, "SAME")
            x = ops.add(x, y)
            channels = width
    final = bn_relu(("bn_final",))

    def head(x):
        x = jnp.mean(final(x), axis=(1, 2))
        layer = nn.Dense(module.num_classes, dtype=module.dtype)
        return layer.apply({"params": params["logits"]}, x).astype(jnp.float32)

    return ops.head(x, head, channels * module.num_classes)


def _graph_of(module: nn.Module) -> Callable[..., Any] | None:
    if type(module) is models.LeNet:
        return _lenet_graph
    if type(module) is models.ResNet:
        return _resnet_graph
    return None


@dataclasses.dataclass(frozen=True)
class CandidateForward:
    """`(variables, images (S, H, W, 3), pixels (S, P, 1, 5)) -> logits (S*P, C)`.

    The value of `apply_fn(variables, attack_de.perturbed_batch(images, pixels))`,
    computed from the clean images' activations (once per image) and, per
    candidate, only the windows of the early layers that its pixel reaches. A
    layer whose window covers at least `densify_fraction` of its map, and every
    layer after it, is computed whole. Pixels must lie inside the image (as
    `attack_de.decode_candidates` gives them). Hashable: compiled programs can be
    cached on it, as on `models.InferenceApply`.
    """

    module: nn.Module
    densify_fraction: float = DENSIFY_FRACTION

    def __call__(
        self, variables: Variables, images: Images, pixels: Perturbation
    ) -> jax.Array:
        return self._run(variables, images, pixels, None)

    def _run(self, variables, images, pixels, counter):
        graph = _graph_of(self.module)
        if pixels.ndim != 4 or pixels.shape[2:] != (1, 5):
            raise PropmapsError(
                f"the candidate forward takes pixels (slots, population, 1, 5), one "
                f"pixel per candidate, got shape {tuple(pixels.shape)}; use the "
                f"model's plain forward for more pixels"
            )
        images = jnp.asarray(images, jnp.float32)
        slots, population = pixels.shape[:2]
        dense = _DenseOps(variables, self.module.dtype, counter)
        graph(dense, self.module, variables, images)
        clean = dense.record

        def one(clean_maps, pixel):
            ops = _WindowOps(
                variables,
                self.module.dtype,
                clean_maps,
                pixel,
                self.densify_fraction,
                counter,
            )
            return graph(ops, self.module, variables, images)[0]

        per_image = jax.vmap(one, in_axes=(None, 0))
        logits = jax.vmap(per_image)(clean, jnp.asarray(pixels, jnp.int32)[:, :, 0])
        return logits.reshape(slots * population, -1)

    def multiply_adds(
        self, variables: Variables, image_shape: tuple[int, int, int] = (32, 32, 3)
    ) -> dict[str, int]:
        """Multiply-adds of the convolutions and dense layers (traced, not run):
        `full` per image of the plain forward (= this forward's clean pass),
        `candidate` per candidate, of which `candidate_windowed` in windows."""
        counter = _Counter()
        jax.eval_shape(
            lambda v: self._run(
                v,
                jnp.zeros((1, *image_shape), jnp.float32),
                jnp.zeros((1, 1, 1, 5), jnp.int32),
                counter,
            ),
            variables,
        )
        return {
            "full": counter.per_image,
            "candidate": counter.per_candidate,
            "candidate_windowed": counter.per_candidate_windowed,
        }


def make_candidate_forward(
    module: nn.Module,
    pixels_per_candidate: int,
    densify_fraction: float = DENSIFY_FRACTION,
) -> CandidateForward | None:
    """The windowed candidate forward of `module`, or None where it does not apply.

    `models.MLP` gets `DenseCandidateForward` (its first layer updated by the one
    changed pixel's three input rows). None for a module other than `models.LeNet`
    / `models.ResNet` / `models.MLP` (subclasses included: they may change the
    layers), a dtype other than float32, or more
    than one pixel per candidate (k pixels anywhere in the image have no window
    smaller than the image in general).
    """
    if pixels_per_candidate != 1:
        return None
    if type(module) is not models.MLP and _graph_of(module) is None:
        return None  # checked first: another module may have no dtype at all
    if jnp.dtype(module.dtype) != jnp.dtype(jnp.float32):
        return None
    if type(module) is models.MLP:
        return DenseCandidateForward(module)
    return CandidateForward(module, float(densify_fraction))


@dataclasses.dataclass(frozen=True)
class DenseCandidateForward:
    """`CandidateForward`'s contract for `models.MLP`: a one-pixel candidate changes
    only three inputs of the first dense layer, so its pre-activation is the clean
    image's (computed once per image) plus the change of those three inputs times
    their three rows of the kernel: 3 x width multiply-adds instead of H*W*3 x width.
    The layers after it run in full. Equals the plain forward up to float rounding.
    """

    module: nn.Module

    def __call__(
        self, variables: Variables, images: Images, pixels: Perturbation
    ) -> jax.Array:
        if pixels.ndim != 4 or pixels.shape[2:] != (1, 5):
            raise PropmapsError(
                f"the candidate forward takes pixels (slots, population, 1, 5), one "
                f"pixel per candidate, got shape {tuple(pixels.shape)}; use the "
                f"model's plain forward for more pixels"
            )
        module, params = self.module, variables["params"]
        images = jnp.asarray(images, jnp.float32)
        slots, population = pixels.shape[:2]
        _, height, width, channels = images.shape
        x = models.normalize(images, module.mean, module.std).astype(module.dtype)
        first = params["fc1"]
        kernel = jnp.asarray(first["kernel"], module.dtype)
        clean = x.reshape(slots, -1) @ kernel + first["bias"]  # (S, width)
        pixel = jnp.asarray(pixels, jnp.int32)[:, :, 0]  # (S, P, 5)
        row, col = pixel[..., 0], pixel[..., 1]
        colour = models.normalize(
            pixel[..., 2:5].astype(jnp.float32), module.mean, module.std
        ).astype(module.dtype)
        old = x[jnp.arange(slots)[:, None], row, col]  # (S, P, C)
        first_input = (row * width + col) * channels  # (H, W, C) flatten order
        rows = kernel[first_input[..., None] + jnp.arange(channels)]  # (S, P, C, F)
        h = clean[:, None, :] + jnp.einsum("spc,spcf->spf", colour - old, rows)
        h = nn.relu(h.reshape(slots * population, -1))
        for i in range(1, len(module.hidden)):
            layer = nn.Dense(module.hidden[i], dtype=module.dtype)
            h = nn.relu(layer.apply({"params": params[f"fc{i + 1}"]}, h))
        layer = nn.Dense(module.num_classes, dtype=module.dtype)
        return layer.apply({"params": params["logits"]}, h).astype(jnp.float32)
