"""Training: state, optimizer and schedule, on-device augmentation, train/eval steps.

Everything here is pure: `train_step` and `eval_step` take the module and optimizer as
their first arguments so that call sites bind them with `functools.partial` and apply
`jax.jit` (donating the state). Randomness is reproducible and independent of batch
size: an example's augmentation key is `fold_in(epoch_key, dataset_index)`, and the
shuffle order is a function of (seed, epoch) only.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax import serialization

from propmaps_jax import batching, models
from propmaps_jax.errors import PropmapsError
from propmaps_jax.progress import format_duration
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


def initial_state(
    module: nn.Module,
    optimizer: optax.GradientTransformation,
    seed: int,
    image_shape: tuple[int, int, int] = (32, 32, 3),
    variables: Variables | None = None,
) -> tuple[TrainState, PRNGKey]:
    """(state, augmentation key) of a run with `seed`: the two streams of
    `key(seed)`, `fold_in(·, 0)` to initialise the variables (unless `variables`
    are given: a fine-tune) and `fold_in(·, 1)` for the augmentation."""
    base_key = jax.random.key(seed)
    if variables is None:
        state = create_train_state(
            module, optimizer, jax.random.fold_in(base_key, 0), image_shape
        )
    else:
        state = state_from_variables(variables, optimizer)
    return state, jax.random.fold_in(base_key, 1)


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


def resume_record(state: TrainState, augment_key: PRNGKey) -> dict[str, Any]:
    """What a checkpoint keeps besides the variables to resume exactly: the step,
    the optimizer state and the augmentation key (read back by `restore`)."""
    return {
        "step": np.asarray(state.step),
        "opt_state": state.opt_state,
        "rng": np.asarray(jax.random.key_data(augment_key)),
    }


def restore(
    fresh: TrainState, variables: Variables, record: dict[str, Any] | None
) -> tuple[TrainState, PRNGKey]:
    """(train state, augmentation key) of a checkpoint: its `variables` (checked to
    fit the model) and its `resume_record`, read with `fresh` (a new state of the
    same model and optimizer) as the template of the optimizer state.
    PropmapsError "no usable training state (...)" when the record does not fit."""
    record = record or {}
    try:
        opt_state = serialization.from_state_dict(fresh.opt_state, record["opt_state"])
        step = int(record["step"])
        augment_key = jax.random.wrap_key_data(np.asarray(record["rng"], np.uint32))
    except (KeyError, TypeError, ValueError) as e:
        raise PropmapsError(f"no usable training state ({e})") from None
    state = TrainState(
        step=jnp.asarray(step, jnp.int32),
        params=variables["params"],
        batch_stats=variables.get("batch_stats", {}),
        opt_state=jax.tree_util.tree_map(jnp.asarray, opt_state),
    )
    return state, augment_key


class Diverged(PropmapsError):
    """Training reached a non-finite loss or non-finite weights (`fit` raises it
    before anything of that step is checkpointed)."""

    def __init__(self, epoch: int, what: str):
        super().__init__(f"training diverged at epoch {epoch} ({what})")
        self.epoch, self.what = epoch, what


class StepFns(NamedTuple):
    """The jitted steps of one model and optimizer (`jit_steps`)."""

    train: Callable  # (state, images, labels, indices, epoch_key): state donated
    eval: Callable  # (variables, images, labels, mask) -> batch sums
    finite: Callable  # (variables) -> bool array


def jit_steps(
    module: nn.Module, optimizer: optax.GradientTransformation, do_augment: bool
) -> StepFns:
    """`train_step` (donating the state), `eval_step` and `all_finite`, jitted."""
    return StepFns(
        train=jax.jit(
            functools.partial(train_step, module, optimizer, do_augment=do_augment),
            donate_argnums=(0,),
        ),
        eval=jax.jit(functools.partial(eval_step, module)),
        finite=jax.jit(all_finite),
    )


def fit(
    steps: StepFns,
    state: TrainState,
    augment_key: PRNGKey,
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    *,
    seed: int,
    epochs: int,
    batch_size: int,
    eval_every: int = 1,
    eval_batch_size: int = 1000,
    checkpoint_every_steps: int = 0,
    stop_after_epochs: int | None = None,
    history: list[dict[str, Any]] | None = None,
    on_checkpoint: Callable[[TrainState, list, float | None], None] = lambda *a: None,
    should_stop: Callable[[], bool] = lambda: False,
    log: Callable[..., None] = lambda *a: None,
    log_every_s: float = 15.0,
) -> tuple[TrainState, list[dict[str, Any]], float | None]:
    """Train from `state` (step 0, or a resumed one) to the end of epoch `epochs`.

    Each epoch shuffles by `epoch_permutation(seed, epoch)` and augments with
    `fold_in(augment_key, epoch)`, so that a run resumed at any step ends with
    exactly the model of an uninterrupted one. `on_checkpoint(state, history,
    test_accuracy)` is called at the end of every epoch (after its evaluation, every
    `eval_every` epochs and at the last) and every `checkpoint_every_steps` steps
    inside one (test accuracy None); `Diverged` is raised instead once the loss or
    the weights are no longer finite. Stops early, after an epoch's checkpoint, at
    the end of epoch `stop_after_epochs` or when `should_stop()`. `log(format,
    *args)` gets a progress line every `log_every_s` seconds and each evaluation.

    Returns (state, history: one record per epoch, test accuracy: of the last
    epoch, measured at the end of training when that epoch was not evaluated).
    """
    x_train, y_train = train
    x_test, y_test = test
    history = [] if history is None else history
    steps_per_epoch = len(x_train) // batch_size
    total_steps = steps_per_epoch * epochs
    last_epoch = epochs if stop_after_epochs is None else min(epochs, stop_after_epochs)

    def require_finite(
        epoch: int, loss: float, check_weights: bool = True, name: str = "loss"
    ) -> None:
        weights_finite = not check_weights or bool(steps.finite(state.variables))
        if math.isfinite(loss) and weights_finite:
            return
        what = f"{name} {loss:.4g}"
        raise Diverged(epoch, what if weights_finite else what + ", weights not finite")

    step = int(state.step)
    test_accuracy = None
    while step < last_epoch * steps_per_epoch:
        epoch = step // steps_per_epoch
        order = epoch_permutation(seed, epoch, len(x_train))
        epoch_key = jax.random.fold_in(augment_key, epoch)
        epoch_start, last_log = time.time(), time.time()
        first_step = step
        loss_sum = jnp.zeros(()), jnp.zeros(())
        for position in range(step % steps_per_epoch, steps_per_epoch):
            idx = order[position * batch_size : (position + 1) * batch_size]
            state, metrics = steps.train(
                state, x_train[idx], y_train[idx], idx.astype(np.int32), epoch_key
            )
            loss_sum = loss_sum[0] + metrics["loss"], loss_sum[1] + metrics["accuracy"]
            step += 1
            done = step - first_step
            now = time.time()
            if now - last_log >= log_every_s or position == steps_per_epoch - 1:
                last_log = now
                require_finite(epoch + 1, float(loss_sum[0]) / done, False)
                rate = done * batch_size / max(now - epoch_start, 1e-9)
                log(
                    "epoch %d/%d step %d/%d: loss %.4f, train acc %.2f%%, "
                    "%.0f images/s, ETA %s",
                    epoch + 1,
                    epochs,
                    step,
                    total_steps,
                    float(loss_sum[0]) / done,
                    100 * float(loss_sum[1]) / done,
                    rate,
                    format_duration((total_steps - step) * batch_size / rate),
                )
            every = checkpoint_every_steps
            if every and step % every == 0 and step % steps_per_epoch:
                require_finite(epoch + 1, float(loss_sum[0]) / done)
                on_checkpoint(state, history, None)
        epoch_done = step // steps_per_epoch
        done = max(step - first_step, 1)
        require_finite(epoch + 1, float(loss_sum[0]) / done)
        test_accuracy = None
        if epoch_done % eval_every == 0 or epoch_done == epochs:
            test_accuracy, test_loss = evaluate(
                steps.eval, state.variables, x_test, y_test, eval_batch_size
            )
            require_finite(epoch + 1, test_loss, False, "test loss")
            log(
                "epoch %d/%d: test accuracy %.2f%%, test loss %.4f (%.1f s)",
                epoch_done,
                epochs,
                100 * test_accuracy,
                test_loss,
                time.time() - epoch_start,
            )
        history.append(
            {
                "epoch": epoch_done,
                "train_loss": float(loss_sum[0]) / done,
                "train_accuracy": float(loss_sum[1]) / done,
                "test_accuracy": test_accuracy,
                "seconds": time.time() - epoch_start,
            }
        )
        on_checkpoint(state, history, test_accuracy)
        if should_stop() and step < last_epoch * steps_per_epoch:
            return state, history, test_accuracy
    if step == total_steps and test_accuracy is None:
        test_accuracy, _ = evaluate(
            steps.eval, state.variables, x_test, y_test, eval_batch_size
        )
    return state, history, test_accuracy
