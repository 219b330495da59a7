"""LeNet's first convolution computed on pairs of columns: same parameters, same sums.

A speed trick measured on CPU (XLA's convolution with 3 input channels is slow
there; folding pairs of columns into the channels makes it 4x faster, see
BENCHMARKS.md). Whether a model uses it is decided per backend by
`propmaps_jax.backend` (one rule, with where it was measured).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from propmaps_jax.errors import PropmapsError


class ColumnPairConv(nn.Conv):
    """`nn.Conv` (VALID, stride 1, same parameters) computed on pairs of columns.

    The input's columns are folded in pairs into its channels and the kernel is
    rearranged to match (each output pair of columns reads 3 input pairs), so the
    convolution has twice the channels on half the width. It computes the same
    sums in another order: the bundled LeNet's logits agree with the plain
    convolution's to a few float32 ulps (at most 5.7e-6 on 1,000 test images on
    this project's CPU, jax 0.10.2; the same predictions), and tests check 1e-5.
    XLA's CPU backend runs a convolution with few channels slowly (LeNet's first
    layer, 3 -> 6 channels, at about 5 GMAC/s); folded, it runs about 4x faster
    (BENCHMARKS.md). `LeNet` uses it where `backend.CHOICES` says so
    ("column_pair_conv": CPU).
    """

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        kh, kw = self.kernel_size
        if self.padding != "VALID" or self.strides not in (None, 1, (1, 1)):
            raise PropmapsError("ColumnPairConv supports VALID convolutions, stride 1")
        channels = inputs.shape[-1]
        kernel = self.param(
            "kernel",
            self.kernel_init,
            (kh, kw, channels, self.features),
            self.param_dtype,
        )
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
        inputs, kernel, bias = nn.dtypes.promote_dtype(
            inputs, kernel, bias, dtype=self.dtype
        )
        return column_pair_conv(inputs, kernel, self.precision) + bias


def column_pair_conv(x: jax.Array, kernel: jax.Array, precision: Any = None):
    """The VALID, stride-1 convolution of x (N, H, W, C) with kernel (kh, kw, C, F),
    computed with the columns of x and of the output folded in pairs."""
    n, h, w, c = x.shape
    kh, kw, _, features = kernel.shape
    out_h, out_w = h - kh + 1, w - kw + 1
    pairs_out = -(-out_w // 2)
    taps = (kw + 1) // 2 + 1  # input pairs read by one output pair
    width = 2 * (pairs_out + taps - 1)
    x = jnp.pad(x, ((0, 0), (0, 0), (0, width - w), (0, 0)))
    x = x.reshape(n, h, width // 2, 2 * c)  # channel = (column in pair, c)
    # select[j, v, s, b] = 1 where input column 2v + s feeds output column b by tap j.
    select = np.zeros((kw, taps, 2, 2), np.float32)
    for j in range(kw):
        for b in range(2):
            v, s_ = divmod(b + j, 2)
            select[j, v, s_, b] = 1.0
    folded = jnp.einsum(
        "jvsb,ijco->ivscbo", select.astype(kernel.dtype), kernel, precision="highest"
    ).reshape(kh, taps, 2 * c, 2 * features)
    y = jax.lax.conv_general_dilated(
        x,
        folded,
        (1, 1),
        "VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=precision,
    )  # (n, out_h, pairs_out, 2 * features): channel = (column in pair, feature)
    y = y.reshape(n, out_h, 2 * pairs_out, features)
    return y[:, :, :out_w]
