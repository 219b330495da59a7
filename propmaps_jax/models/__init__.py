"""The networks and what loads them.

- `contract`: what any model (linen, nnx, a plain function) must be to be attacked
  and mapped, `features_fn(variables, images) -> (logits, layers)`, checked by
  `check_model`; the linen adapters `linen_features` and `make_apply_fn`;
- `nets`: LeNet, the pre-activation ResNets, `ModelConfig`, `create_model` and the
  one helper for feature maps, `layer_outputs` (the names of both are re-exported
  here: `pj.models.layer_outputs`);
- `column_pair`: LeNet's first convolution on pairs of columns (a CPU speed trick);
- `receptive`: the attack's candidate forward that recomputes only the receptive
  field of the changed pixel;
- `checkpoint`: bundled and saved weights; `keras_import`: the public Keras models;
- `checks`: what loaded weights must satisfy before any work (finite variables,
  the data's class count, finite logits on a few images).
"""

from propmaps_jax.models.checks import (
    check_finite_variables,
    check_num_classes,
    check_outputs_finite,
)
from propmaps_jax.models.column_pair import ColumnPairConv, column_pair_conv
from propmaps_jax.models.contract import (
    LAYER_KINDS,
    InferenceApply,
    LinenFeatures,
    LogitsOf,
    call_features,
    check_model,
    is_batch_norm,
    linen_features,
    logits_of,
    make_apply_fn,
    make_logits_fn,
)
from propmaps_jax.models.nets import (
    CIFAR10_CLASSES,
    CIFAR10_MEAN,
    CIFAR10_STD,
    MLP,
    MODEL_REGISTRY,
    LeNet,
    LeNetTiny,
    ModelConfig,
    PreActBlock,
    ResNet,
    ResNet20,
    ResNet32,
    ResNetTiny,
    check_permutation,
    check_variables_fit,
    count_params,
    create_model,
    default_config,
    for_platform,
    init_variables,
    inverse_permutation,
    is_conv,
    is_conv_or_block,
    layer_outputs,
    normalize,
    permute_pixels,
    pixel_permutation,
    variables_template,
)

__all__ = [
    "LAYER_KINDS",
    "LinenFeatures",
    "LogitsOf",
    "call_features",
    "check_model",
    "is_batch_norm",
    "linen_features",
    "logits_of",
    "CIFAR10_CLASSES",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "ColumnPairConv",
    "InferenceApply",
    "LeNet",
    "LeNetTiny",
    "MLP",
    "MODEL_REGISTRY",
    "ModelConfig",
    "PreActBlock",
    "ResNet",
    "ResNet20",
    "ResNet32",
    "ResNetTiny",
    "check_finite_variables",
    "check_num_classes",
    "check_outputs_finite",
    "check_permutation",
    "check_variables_fit",
    "column_pair_conv",
    "count_params",
    "create_model",
    "default_config",
    "for_platform",
    "init_variables",
    "inverse_permutation",
    "is_conv",
    "is_conv_or_block",
    "layer_outputs",
    "make_apply_fn",
    "make_logits_fn",
    "normalize",
    "permute_pixels",
    "pixel_permutation",
    "variables_template",
]

from propmaps_jax._lazy import submodule_getattr  # noqa: E402

__getattr__ = submodule_getattr(__name__, __path__)
