"""Import Keras 2 HDF5 models (lenet.h5, resnet.h5 of one-pixel-attack-keras) with h5py.

No TensorFlow: the Keras graph is read from the file's `model_config` JSON and the
arrays from `model_weights/<layer>/<layer>/<name>:0`. The graph is *matched* against
the structure of our Flax model (a LeNet chain, or a pre-activation ResNet walked
block by block through the residual `Add`s) before any array is copied, so a file of
another architecture is reported instead of silently mapped onto the wrong layers.
Keras Conv2D kernels are HWIO and Dense kernels (in, out), as in Flax.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import h5py
import numpy as np

from propmaps_jax import models
from propmaps_jax.errors import WeightsError
from propmaps_jax.types import Variables

# Input normalisation of the one-pixel-attack-keras models (its README), x in 0..255.
KERAS_MEAN = (125.307, 122.95, 113.865)
KERAS_STD = (62.9932, 62.0887, 66.7048)
# Our BatchNorm's epsilon (nets._batch_norm); Keras' default, used by resnet.h5.
BN_EPSILON = 1e-3

_SKIPPED = ("InputLayer", "Dropout")  # no weights, identity at inference


class _StructureError(Exception):
    """The Keras graph does not have the structure of the requested model."""


@dataclasses.dataclass(frozen=True)
class KerasLayer:
    """One layer of a Keras graph: name, class, config and the layers it reads."""

    name: str
    class_name: str
    config: dict[str, Any]
    inbound: tuple[str, ...]


@dataclasses.dataclass
class KerasFile:
    """What is read from a Keras HDF5 file: graph, weights and file attributes."""

    path: str
    layers: dict[str, KerasLayer]  # in the file's (topological) order
    weights: dict[str, dict[str, np.ndarray]]  # layer -> {"kernel": ..., ...}
    attrs: dict[str, str]

    def consumers(self, name: str) -> list[KerasLayer]:
        """The layers that read the output of layer `name`, in graph order."""
        return [layer for layer in self.layers.values() if name in layer.inbound]


def _as_str(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _parse_graph(model_config: dict[str, Any]) -> dict[str, KerasLayer]:
    """Keras `model_config` -> {name: KerasLayer} (Sequential or functional model)."""
    class_name = model_config.get("class_name")
    config = model_config.get("config")
    layers: dict[str, KerasLayer] = {}
    if class_name == "Sequential":
        # Keras 2.1 stores a list of layers, Keras >= 2.2 {"name", "layers"}.
        entries = config["layers"] if isinstance(config, dict) else config
        previous = "input"
        for entry in entries:
            name = entry["config"]["name"]
            layers[name] = KerasLayer(
                name, entry["class_name"], entry["config"], (previous,)
            )
            previous = name
        return layers
    if class_name in ("Model", "Functional"):
        for entry in config["layers"]:
            nodes = entry.get("inbound_nodes", [])
            if len(nodes) > 1:
                raise _StructureError(f"layer {entry['name']} is used more than once")
            inbound = tuple(t[0] for t in nodes[0]) if nodes else ()
            layers[entry["name"]] = KerasLayer(
                entry["name"], entry["class_name"], entry["config"], inbound
            )
        return layers
    raise _StructureError(f"unsupported Keras model class {class_name!r}")


# More values than any weight array of the supported models holds by far (ResNet's
# largest has 36,864): a larger one is a damaged file, refused before it is read.
MAX_WEIGHT_VALUES = 1 << 26


def _weight_array(dataset: Any, name: str, path: str) -> np.ndarray:
    """The numeric array of an HDF5 weight dataset, checked before it is read."""
    if not isinstance(dataset, h5py.Dataset):
        raise WeightsError(f"{path}: weight {name} is not an array (an HDF5 group)")
    if dataset.dtype.kind not in "fiu":
        raise WeightsError(
            f"{path}: weight {name} holds {dataset.dtype} values, not numbers; the "
            "file is damaged or not a Keras model: pass a Keras .h5 saved by "
            "model.save(...)"
        )
    if dataset.size > MAX_WEIGHT_VALUES:
        raise WeightsError(
            f"{path}: weight {name} has shape {dataset.shape} ({dataset.size:,} "
            f"values, more than the {MAX_WEIGHT_VALUES:,} any supported model "
            "needs); the file is damaged: pass a Keras .h5 saved by model.save(...)"
        )
    return np.asarray(dataset)


def read_keras_file(path: str) -> KerasFile:
    """Graph and weight arrays of a Keras 2 HDF5 file (WeightsError if unreadable)."""
    with open(path, "rb") as f:
        magic = f.read(8)
    if magic.startswith(b"PK"):
        raise WeightsError(
            f"{path} is a Keras 3 .keras zip archive; only Keras 2 HDF5 files are "
            "supported: re-save the model with model.save('model.h5')"
        )
    try:
        with h5py.File(path, "r") as f:
            attrs = {k: _as_str(v) for k, v in f.attrs.items()}
            if "model_config" not in attrs:
                raise WeightsError(
                    f"{path} has no Keras model_config (a weights-only file saved with "
                    "save_weights?): pass a file written by model.save(...)"
                )
            layers = _parse_graph(json.loads(attrs["model_config"]))
            group = f["model_weights"] if "model_weights" in f else f
            weights: dict[str, dict[str, np.ndarray]] = {}
            for name in layers:
                if name not in group:
                    continue
                layer_group = group[name]
                arrays = {}
                for weight_name in layer_group.attrs.get("weight_names", []):
                    weight_name = _as_str(weight_name)
                    # "conv2d_1/kernel:0" -> "kernel"
                    short = weight_name.split("/")[-1].split(":")[0]
                    arrays[short] = _weight_array(
                        layer_group[weight_name], weight_name, path
                    )
                weights[name] = arrays
    except WeightsError:
        raise
    except _StructureError as e:
        raise WeightsError(f"{path}: cannot read its Keras graph ({e})") from None
    except (OSError, KeyError, ValueError, TypeError, MemoryError) as e:
        raise WeightsError(
            f"{path} is not a readable Keras 2 HDF5 file ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); it may be truncated or "
            "corrupt, or not a Keras model: pass a Keras .h5 saved by model.save(...)"
        ) from None
    backend = attrs.get("backend", "tensorflow")
    if backend != "tensorflow":
        raise WeightsError(
            f"{path} was saved with the {backend!r} Keras backend; only TensorFlow-"
            "backend files (HWIO kernels) are supported"
        )
    return KerasFile(path, layers, weights, attrs)


# --- structure matching ------------------------------------------------------------


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise _StructureError(message)


def _expect(layer: KerasLayer | None, class_name: str, **config: Any) -> KerasLayer:
    """Check a layer's class and selected config values."""
    _check(layer is not None, f"expected a {class_name} layer, found the end")
    _check(
        layer.class_name == class_name,
        f"expected a {class_name} layer, found {layer.class_name} {layer.name}",
    )
    for key, want in config.items():
        got = layer.config.get(key)
        if isinstance(got, list):
            got = tuple(got)
        _check(got == want, f"{layer.name}: {key} is {got!r}, expected {want!r}")
    return layer


def _only_consumer(keras: KerasFile, name: str) -> KerasLayer:
    found = keras.consumers(name)
    _check(
        len(found) == 1,
        f"{name} feeds {len(found)} layers ({', '.join(c.name for c in found)}), "
        "expected 1",
    )
    return found[0]


def _conv_config(kernel: int, padding: str, activation: str) -> dict[str, Any]:
    return {
        "kernel_size": (kernel, kernel),
        "padding": padding,
        "activation": activation,
        "use_bias": True,
        "dilation_rate": (1, 1),
        "data_format": "channels_last",
    }


def _bn(keras: KerasFile, layer: KerasLayer | None) -> KerasLayer:
    layer = _expect(layer, "BatchNormalization", center=True, scale=True)
    _check(layer.config.get("axis") in (-1, 3, [3]), f"{layer.name}: axis is not -1")
    eps = layer.config.get("epsilon")
    _check(
        eps is not None and abs(eps - BN_EPSILON) < 1e-9,
        f"{layer.name}: epsilon {eps}, ours is {BN_EPSILON}",
    )
    return layer


def _relu_after(keras: KerasFile, name: str) -> KerasLayer:
    return _expect(_only_consumer(keras, name), "Activation", activation="relu")


def _match_lenet(keras: KerasFile, module: models.LeNet) -> dict[str, str]:
    """{flax module path: keras layer} for a LeNet chain (fused or separate ReLUs)."""
    chain = []
    layer = next(iter(keras.layers.values()))
    while layer is not None:
        if layer.class_name not in _SKIPPED:
            chain.append(layer)
        nxt = keras.consumers(layer.name)
        _check(len(nxt) <= 1, f"{layer.name} feeds several layers: not a chain")
        layer = nxt[0] if nxt else None

    position = 0

    def take(class_name: str, **config: Any) -> KerasLayer:
        nonlocal position
        found = _expect(
            chain[position] if position < len(chain) else None, class_name, **config
        )
        position += 1
        activation = found.config.get("activation")
        if (
            class_name in ("Conv2D", "Dense")
            and activation == "linear"
            and position < len(chain)
            and chain[position].class_name == "Activation"
        ):  # a separate Activation layer after a linear Conv2D/Dense
            activation = chain[position].config.get("activation")
            position += 1
        want = config.get("activation")
        _check(
            want is None or activation == want,
            f"{found.name}: activation {activation!r}, expected {want!r}",
        )
        return found

    mapping = {}
    for i in range(len(module.features)):
        conv = take("Conv2D", strides=(1, 1), **_conv_config(5, "valid", "relu"))
        mapping[f"conv{i + 1}"] = conv.name
        take("MaxPooling2D", pool_size=(2, 2), strides=(2, 2), padding="valid")
    take("Flatten")
    for i in range(len(module.hidden)):
        mapping[f"fc{i + 1}"] = take("Dense", activation="relu", use_bias=True).name
    last = chain[position] if position < len(chain) else None
    last = _expect(last, "Dense", use_bias=True)
    _check(
        last.config.get("activation") in ("softmax", "linear"),
        f"{last.name}: last activation {last.config.get('activation')!r}",
    )
    mapping["logits"] = last.name
    position += 1
    _check(
        position == len(chain),
        f"unexpected layers after {last.name}: "
        f"{', '.join(x.name for x in chain[position:])}",
    )
    return mapping


def _match_resnet(keras: KerasFile, module: models.ResNet) -> dict[str, str]:
    """{flax module path: keras layer}, walking the residual blocks by their Adds."""
    inputs = [x for x in keras.layers.values() if x.class_name == "InputLayer"]
    _check(len(inputs) == 1, f"expected one InputLayer, found {len(inputs)}")
    stem = _expect(
        _only_consumer(keras, inputs[0].name),
        "Conv2D",
        strides=(1, 1),
        **_conv_config(3, "same", "linear"),
    )
    mapping = {"stem": stem.name}
    block_input = stem.name
    blocks: list[tuple[int, bool]] = []  # (conv1 stride, has projection shortcut)
    while True:
        readers = keras.consumers(block_input)
        bns = [x for x in readers if x.class_name == "BatchNormalization"]
        others = [x for x in readers if x.class_name != "BatchNormalization"]
        _check(len(bns) == 1, f"{block_input} does not feed exactly one BN")
        if not others:  # final BN, ReLU, global average pooling, Dense
            mapping["bn_final"] = _bn(keras, bns[0]).name
            relu = _relu_after(keras, bns[0].name)
            pool = _expect(_only_consumer(keras, relu.name), "GlobalAveragePooling2D")
            dense = _expect(_only_consumer(keras, pool.name), "Dense", use_bias=True)
            _check(
                dense.config.get("activation") in ("softmax", "linear"),
                f"{dense.name}: activation {dense.config.get('activation')!r}",
            )
            _check(not keras.consumers(dense.name), f"layers after {dense.name}")
            mapping["logits"] = dense.name
            break
        prefix = (
            f"stage{len(blocks) // module.blocks_per_stage + 1}_"
            f"block{len(blocks) % module.blocks_per_stage + 1}"
        )
        _check(
            len(blocks) < len(module.widths) * module.blocks_per_stage,
            f"more residual blocks than the {len(module.widths)} x "
            f"{module.blocks_per_stage} of our model",
        )
        bn1 = _bn(keras, bns[0])
        conv1 = _expect(
            _only_consumer(keras, _relu_after(keras, bn1.name).name),
            "Conv2D",
            **_conv_config(3, "same", "linear"),
        )
        bn2 = _bn(keras, _only_consumer(keras, conv1.name))
        conv2 = _expect(
            _only_consumer(keras, _relu_after(keras, bn2.name).name),
            "Conv2D",
            strides=(1, 1),
            **_conv_config(3, "same", "linear"),
        )
        add = _expect(_only_consumer(keras, conv2.name), "Add")
        _check(len(others) == 1, f"{block_input} feeds {len(others)} non-BN layers")
        shortcut = others[0]
        if shortcut.class_name == "Conv2D":
            _expect(shortcut, "Conv2D", **_conv_config(1, "same", "linear"))
            _check(
                shortcut.config.get("strides") == conv1.config.get("strides"),
                f"{shortcut.name}: stride differs from {conv1.name}",
            )
            _check(
                _only_consumer(keras, shortcut.name).name == add.name,
                f"{shortcut.name} does not feed {add.name}",
            )
            expected_inputs = {conv2.name, shortcut.name}
        else:
            _check(shortcut.name == add.name, f"{block_input} skips to {shortcut.name}")
            expected_inputs = {conv2.name, block_input}
        _check(
            set(add.inbound) == expected_inputs and len(add.inbound) == 2,
            f"{add.name} adds {add.inbound}, expected {sorted(expected_inputs)}",
        )
        strides = tuple(conv1.config.get("strides"))
        _check(strides[0] == strides[1], f"{conv1.name}: unequal strides {strides}")
        mapping.update(
            {
                f"{prefix}/bn1": bn1.name,
                f"{prefix}/conv1": conv1.name,
                f"{prefix}/bn2": bn2.name,
                f"{prefix}/conv2": conv2.name,
            }
        )
        if shortcut.class_name == "Conv2D":
            mapping[f"{prefix}/shortcut"] = shortcut.name
        blocks.append((strides[0], shortcut.class_name == "Conv2D"))
        block_input = add.name

    expected_blocks = len(module.widths) * module.blocks_per_stage
    _check(
        len(blocks) == expected_blocks,
        f"{len(blocks)} residual blocks, our model has {expected_blocks}",
    )
    for i, (stride, projection) in enumerate(blocks):
        stage, block = divmod(i, module.blocks_per_stage)
        first_of_later_stage = stage > 0 and block == 0
        want = 2 if first_of_later_stage else 1
        _check(
            stride == want,
            f"block {i + 1} has stride {stride}, our model expects {want}",
        )
        _check(
            projection == first_of_later_stage,
            f"block {i + 1} {'has' if projection else 'lacks'} a projection "
            "shortcut, unlike our model",
        )
    return mapping


def _match(keras: KerasFile, module: Any) -> dict[str, str]:
    if isinstance(module, models.LeNet):
        return _match_lenet(keras, module)
    if isinstance(module, models.ResNet):
        return _match_resnet(keras, module)
    raise _StructureError(f"no Keras import for {type(module).__name__} models")


# --- weights ------------------------------------------------------------------------


def _layer_arrays(
    keras: KerasFile, layer: str, names: tuple[str, ...]
) -> list[np.ndarray]:
    arrays = keras.weights.get(layer, {})
    missing = [n for n in names if n not in arrays]
    if missing:
        raise WeightsError(
            f"{keras.path}: layer {layer} lacks weights {', '.join(missing)}; "
            "the file may be damaged: pass a complete Keras .h5"
        )
    return [np.asarray(arrays[n], np.float32) for n in names]


def _variables(keras: KerasFile, mapping: dict[str, str]) -> Variables:
    params: dict[str, Any] = {}
    batch_stats: dict[str, Any] = {}

    def put(tree: dict, path: str, value: dict) -> None:
        *parents, leaf = path.split("/")
        for p in parents:
            tree = tree.setdefault(p, {})
        tree[leaf] = value

    for path, layer in mapping.items():
        if keras.layers[layer].class_name == "BatchNormalization":
            gamma, beta, mean, var = _layer_arrays(
                keras, layer, ("gamma", "beta", "moving_mean", "moving_variance")
            )
            put(params, path, {"scale": gamma, "bias": beta})
            put(batch_stats, path, {"mean": mean, "var": var})
        else:
            kernel, bias = _layer_arrays(keras, layer, ("kernel", "bias"))
            put(params, path, {"kernel": kernel, "bias": bias})
    variables = {"params": params}
    if batch_stats:
        variables["batch_stats"] = batch_stats
    return variables


def _guess_model(keras: KerasFile, exclude: str) -> str | None:
    """The name of a registry model whose structure the file has, if any."""
    for name in models.MODEL_REGISTRY:
        if name == exclude:
            continue
        try:
            _match(keras, models.create_model(name))
        except _StructureError:
            continue
        return name
    return None


def load_keras_weights(
    path: str, model_name: str
) -> tuple[models.ModelConfig, Variables, dict[str, Any]]:
    """(config, variables, metadata) of our `model_name` from a Keras 2 HDF5 file.

    The Keras graph must have our model's structure (checked layer by layer) and its
    arrays our shapes; otherwise a WeightsError says what differs and what to do.
    """
    if not os.path.isfile(path):
        raise WeightsError(f"Keras weights file {path} does not exist")
    config = models.ModelConfig(model_name, mean=KERAS_MEAN, std=KERAS_STD)
    module = models.create_model(config)
    keras = read_keras_file(path)
    try:
        mapping = _match(keras, module)
    except _StructureError as e:
        guess = _guess_model(keras, exclude=model_name)
        hint = (
            f"it looks like a {guess!r} model: use `model_name={guess!r}`"
            if guess
            else f"pass the Keras file of a {model_name!r} model"
        )
        raise WeightsError(
            f"{path} does not have the layer structure of our {model_name!r} "
            f"model ({e}); {hint}"
        ) from None
    variables = models.check_variables_fit(
        models.variables_template(config),
        _variables(keras, mapping),
        f"{path} (as model {model_name!r})",
    )
    metadata = {
        "source": "keras",
        "file": os.path.basename(path),
        "keras_version": keras.attrs.get("keras_version"),
        "backend": keras.attrs.get("backend"),
        "layer_map": mapping,
    }
    return config, variables, metadata
