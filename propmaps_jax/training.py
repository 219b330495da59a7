"""Training: state, optimizer and schedule, on-device augmentation, train/eval steps.

Everything here is pure: `train_step` and `eval_step` take the module and optimizer as
their first arguments so that call sites bind them with `functools.partial` and apply
`jax.jit` (donating the state). Randomness is reproducible and independent of batch
size: an example's augmentation key is `fold_in(epoch_key, dataset_index)`, and the
shuffle order is a function of (seed, epoch) only.
"""

from __future__ import annotations

import math
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from propmaps_jax import batching, models
from propmaps_jax.errors import PropmapsError
from propmaps_jax.types import Images, Labels, PRNGKey, Variables

MOMENTUM = 0.9
CROP_PADDING = 4


@flax.struct.dataclass
class TrainState:
    """What training changes: step counter, parameters, BatchNorm stats, optimizer."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any

    @property
    def variables(self) -> Variables:
        """The model's Flax variables ("batch_stats" only when the model has some)."""
        if self.batch_stats:
            return {"params": self.params, "batch_stats": self.batch_stats}
        return {"params": self.params}


def create_train_state(
    module: nn.Module,
    optimizer: optax.GradientTransformation,
    key: PRNGKey,
    image_shape: tuple[int, int, int] = (32, 32, 3),
) -> TrainState:
    """A fresh TrainState: initial variables of `module` and the optimizer's state."""
    variables = models.init_variables(module, key, image_shape)
    return state_from_variables(variables, optimizer)


def state_from_variables(
    variables: Variables, optimizer: optax.GradientTransformation, step: int = 0
) -> TrainState:
    """A TrainState around existing variables with a fresh optimizer state."""
    params = variables["params"]
    return TrainState(
        step=jnp.asarray(step, jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=optimizer.init(params),
    )


def kernel_mask(params: Any) -> Any:
    """A tree of bools: True for convolution/dense kernels, False for biases and BN."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) == "kernel", params
    )


def make_schedule(
    learning_rate: float, total_steps: int, warmup_steps: int
) -> optax.Schedule:
    """Linear warmup from 0 to `learning_rate` over `warmup_steps`, then cosine to 0."""
    if total_steps <= 0:
        raise PropmapsError(f"training needs at least one step, got {total_steps}")
    if not 0 <= warmup_steps < total_steps:
        raise PropmapsError(
            f"warmup ({warmup_steps} steps) must be shorter than training "
            f"({total_steps} steps): lower `warmup_steps` or raise `total_steps`"
        )
    if warmup_steps == 0:
        return optax.cosine_decay_schedule(learning_rate, total_steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=learning_rate,
        warmup_steps=warmup_steps,
        decay_steps=total_steps,
        end_value=0.0,
    )


def check_hyperparameters(learning_rate: float, weight_decay: float) -> None:
    """PropmapsError unless the learning rate is finite and positive and the weight
    decay finite and non-negative (NaN passes every comparison, so it is named)."""
    if not (math.isfinite(learning_rate) and learning_rate > 0):
        raise PropmapsError(
            f"`learning_rate` must be a positive number, got {learning_rate}"
        )
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise PropmapsError(f"`weight_decay` must be a number >= 0, got {weight_decay}")


def all_finite(tree: Any) -> jax.Array:
    """True when every floating-point leaf of `tree` is finite (no NaN, no inf)."""
    leaves = [
        jnp.all(jnp.isfinite(leaf))
        for leaf in jax.tree_util.tree_leaves(tree)
        if jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.inexact)
    ]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def make_optimizer(
    learning_rate: float,
    weight_decay: float,
    total_steps: int,
    warmup_steps: int = 0,
    momentum: float = MOMENTUM,
) -> optax.GradientTransformation:
    """SGD with Nesterov momentum, L2 weight decay on kernels only, warmup + cosine.

    The decay `weight_decay * kernel` is added to the gradient before momentum (the
    classic ResNet recipe, equal to an L2 penalty `weight_decay / 2 * |kernel|^2`);
    biases and BatchNorm scales/offsets are not decayed.
    """
    check_hyperparameters(learning_rate, weight_decay)
    schedule = make_schedule(learning_rate, total_steps, warmup_steps)
    return optax.chain(
        optax.add_decayed_weights(weight_decay, mask=kernel_mask),
        optax.sgd(schedule, momentum=momentum, nesterov=True),
    )


def random_crop_flip(key: PRNGKey, image: jax.Array, padding_mode: str) -> jax.Array:
    """One image (H, W, C): pad 4 pixels, crop (H, W) at random, flip half the time."""
    height, width, _ = image.shape
    crop_key, flip_key = jax.random.split(key)
    pad = ((CROP_PADDING, CROP_PADDING), (CROP_PADDING, CROP_PADDING), (0, 0))
    padded = jnp.pad(image, pad, mode=padding_mode)
    offsets = jax.random.randint(crop_key, (2,), 0, 2 * CROP_PADDING + 1)
    cropped = jax.lax.dynamic_slice(
        padded, (offsets[0], offsets[1], 0), (height, width, image.shape[2])
    )
    flip = jax.random.bernoulli(flip_key)
    return jnp.where(flip, cropped[:, ::-1, :], cropped)


def augment(
    key: PRNGKey, images: Images, indices: jax.Array, padding_mode: str = "reflect"
) -> jax.Array:
    """Random crop (4-pixel padding) + flip; example i uses fold_in(key, indices[i]).

    `padding_mode` is "reflect" or "constant" (zeros, i.e. black pixels). Keeps dtype
    and shape, so uint8 stays uint8.
    """
    if padding_mode not in ("reflect", "constant"):
        raise PropmapsError(
            f"padding_mode must be 'reflect' or 'constant', got {padding_mode!r}"
        )
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(indices)
    return jax.vmap(lambda k, x: random_crop_flip(k, x, padding_mode))(keys, images)


def cross_entropy(logits: jax.Array, labels: Labels) -> jax.Array:
    """Mean softmax cross-entropy with integer labels."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def train_step(
    module: nn.Module,
    optimizer: optax.GradientTransformation,
    state: TrainState,
    images: Images,
    labels: Labels,
    indices: jax.Array,
    epoch_key: PRNGKey,
    do_augment: bool = True,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One SGD step; returns the new state and the batch's {"loss", "accuracy"}.

    `indices` are the examples' positions in the training set (their augmentation keys
    are `fold_in(epoch_key, index)`). BatchNorm statistics are updated in train mode
    when the model has them; models without BatchNorm (LeNet) work unchanged.
    """
    if do_augment:
        images = augment(epoch_key, images, indices)
    images = images.astype(jnp.float32)
    has_bn = bool(state.batch_stats)

    def loss_fn(params):
        if has_bn:
            logits, updates = module.apply(
                {"params": params, "batch_stats": state.batch_stats},
                images,
                train=True,
                mutable=["batch_stats"],
            )
            new_stats = updates["batch_stats"]
        else:
            logits = module.apply({"params": params}, images, train=True)
            new_stats = state.batch_stats
        return cross_entropy(logits, labels), (logits, new_stats)

    (loss, (logits, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params
    )
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(
        step=state.step + 1, params=params, batch_stats=new_stats, opt_state=opt_state
    )
    accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
    return new_state, {"loss": loss, "accuracy": accuracy}


def eval_step(
    module: nn.Module,
    variables: Variables,
    images: Images,
    labels: Labels,
    mask: jax.Array | None = None,
) -> dict[str, jax.Array]:
    """Batch sums in inference mode: {"correct", "loss", "count"}; mask drops pads."""
    logits = module.apply(variables, jnp.asarray(images, jnp.float32), train=False)
    if mask is None:
        mask = jnp.ones(labels.shape, bool)
    weight = mask.astype(jnp.float32)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    return {
        "correct": jnp.sum(correct * weight),
        "loss": jnp.sum(losses * weight),
        "count": jnp.sum(weight),
    }


def epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
    """The shuffle order of an epoch: a deterministic function of (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def warmup_steps(warmup_epochs: float, steps_per_epoch: int, total_steps: int) -> int:
    """The warm-up in steps, capped at half the run (a warm-up longer than the run
    would never reach the peak learning rate)."""
    return min(int(round(warmup_epochs * steps_per_epoch)), total_steps // 2)


def evaluate(
    eval_fn, variables: Variables, images: np.ndarray, labels: np.ndarray, batch: int
) -> tuple[float, float]:
    """(accuracy, mean loss) on a split, padding the last batch; `eval_fn` is the
    jitted `eval_step` with the module bound."""
    totals = {"correct": 0.0, "loss": 0.0, "count": 0.0}
    for part in batching.batches(len(images), batch):
        take = part.take
        out = eval_fn(variables, images[take], labels[take], part.valid)
        for k in totals:
            totals[k] += float(out[k])
    return totals["correct"] / totals["count"], totals["loss"] / totals["count"]
