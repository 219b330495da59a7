"""An independent float64 NumPy evaluator of a Keras 2 HDF5 model (test reference).

It reads the graph from the file's `model_config` JSON and the arrays with h5py and
evaluates layer by layer, following each layer's `inbound_nodes` (or the chain of a
Sequential model). It shares no code with `propmaps_jax` (no Flax, no JAX), so
agreement with our imported models checks the import, not a copy of it.
"""

from __future__ import annotations

import json
import math

import h5py
import numpy as np

# Input normalisation of the one-pixel-attack-keras models (its README).
MEAN = np.array([125.307, 122.95, 113.865])
STD = np.array([62.9932, 62.0887, 66.7048])


def _activation(x: np.ndarray, name: str) -> np.ndarray:
    if name == "linear":
        return x
    if name == "relu":
        return np.maximum(x, 0.0)
    if name == "softmax":
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)
    raise NotImplementedError(f"activation {name}")


def _tf_padding(size: int, kernel: int, stride: int, padding: str) -> tuple[int, int]:
    """TensorFlow's padding: 'same' pads ceil(size/stride) outputs, extra at the end."""
    if padding == "valid":
        return 0, 0
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def conv2d(
    x: np.ndarray, kernel: np.ndarray, bias: np.ndarray, strides, padding: str
) -> np.ndarray:
    """NHWC convolution (cross-correlation) with an HWIO kernel, float64."""
    kh, kw = kernel.shape[:2]
    sh, sw = strides
    top, bottom = _tf_padding(x.shape[1], kh, sh, padding)
    left, right = _tf_padding(x.shape[2], kw, sw, padding)
    x = np.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    out_h = (x.shape[1] - kh) // sh + 1
    out_w = (x.shape[2] - kw) // sw + 1
    out = np.zeros((x.shape[0], out_h, out_w, kernel.shape[3]))
    for i in range(kh):
        for j in range(kw):
            patch = x[:, i : i + sh * out_h : sh, j : j + sw * out_w : sw, :]
            out += patch @ kernel[i, j]
    return out + bias


def max_pool(x: np.ndarray, pool, strides, padding: str) -> np.ndarray:
    """NHWC max pooling ('valid' only, as in the reference models)."""
    if padding != "valid":
        raise NotImplementedError("max pooling with padding")
    (ph, pw), (sh, sw) = pool, strides
    out_h = (x.shape[1] - ph) // sh + 1
    out_w = (x.shape[2] - pw) // sw + 1
    out = np.full((x.shape[0], out_h, out_w, x.shape[3]), -np.inf)
    for i in range(ph):
        for j in range(pw):
            out = np.maximum(
                out, x[:, i : i + sh * out_h : sh, j : j + sw * out_w : sw]
            )
    return out


def _layer(class_name: str, config: dict, weights: dict, inputs: list) -> np.ndarray:
    if class_name == "InputLayer":
        return inputs[0]
    if class_name == "Conv2D":
        assert config["data_format"] == "channels_last"
        assert tuple(config["dilation_rate"]) == (1, 1)
        bias = weights.get("bias", 0.0)
        y = conv2d(
            inputs[0], weights["kernel"], bias, config["strides"], config["padding"]
        )
        return _activation(y, config["activation"])
    if class_name == "Dense":
        y = inputs[0] @ weights["kernel"] + weights.get("bias", 0.0)
        return _activation(y, config["activation"])
    if class_name == "BatchNormalization":
        assert config["axis"] in (-1, 3)
        scale = weights["gamma"] / np.sqrt(
            weights["moving_variance"] + config["epsilon"]
        )
        return (inputs[0] - weights["moving_mean"]) * scale + weights["beta"]
    if class_name == "Activation":
        return _activation(inputs[0], config["activation"])
    if class_name == "Add":
        return sum(inputs[1:], inputs[0])
    if class_name == "MaxPooling2D":
        return max_pool(
            inputs[0], config["pool_size"], config["strides"], config["padding"]
        )
    if class_name == "Flatten":
        return inputs[0].reshape(inputs[0].shape[0], -1)  # channels_last: H, W, C
    if class_name == "GlobalAveragePooling2D":
        return inputs[0].mean(axis=(1, 2))
    if class_name == "Dropout":
        return inputs[0]
    raise NotImplementedError(f"Keras layer {class_name}")


class KerasReference:
    """A Keras 2 HDF5 model in float64 NumPy: `ref(images in 0..255) -> softmax`."""

    def __init__(self, path: str):
        with h5py.File(path, "r") as f:
            model_config = json.loads(f.attrs["model_config"])
            group = f["model_weights"]
            self.weights = {}
            for name in group:
                layer = group[name]
                self.weights[name] = {
                    w.decode().split("/")[-1].split(":")[0]: np.asarray(
                        layer[w.decode()], np.float64
                    )
                    for w in layer.attrs["weight_names"]
                }
        config = model_config["config"]
        if model_config["class_name"] == "Sequential":
            entries = config["layers"] if isinstance(config, dict) else config
            self.layers = {}
            previous = None
            for entry in entries:
                name = entry["config"]["name"]
                inbound = [] if previous is None else [previous]
                self.layers[name] = (entry["class_name"], entry["config"], inbound)
                previous = name
            self.inputs = [next(iter(self.layers))]
            self.outputs = [previous]
            self.input_is_first_layer = True
        else:
            self.layers = {
                e["name"]: (
                    e["class_name"],
                    e["config"],
                    [t[0] for node in e["inbound_nodes"] for t in node],
                )
                for e in config["layers"]
            }
            self.inputs = [t[0] for t in config["input_layers"]]
            self.outputs = [t[0] for t in config["output_layers"]]
            self.input_is_first_layer = False

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """Softmax output for images (N, 32, 32, 3) with pixel values in 0..255."""
        x = (np.asarray(images, np.float64) - MEAN) / STD
        values: dict[str, np.ndarray] = {}

        def evaluate(name: str) -> np.ndarray:
            if name in values:
                return values[name]
            class_name, config, inbound = self.layers[name]
            if name in self.inputs:
                inputs = [x]
                if not self.input_is_first_layer:  # an InputLayer
                    values[name] = x
                    return x
            else:
                inputs = [evaluate(i) for i in inbound]
            values[name] = _layer(
                class_name, config, self.weights.get(name, {}), inputs
            )
            return values[name]

        (output,) = self.outputs
        return evaluate(output)
