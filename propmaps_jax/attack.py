"""The one-pixel attack (Su et al.): differential evolution over k-pixel perturbations.

A candidate is a real vector of 5k numbers, k times (row, col, r, g, b). It is
searched by evosax's `DifferentialEvolution` with the settings of Su et al.:
DE/rand/1, F = 0.5, no crossover (crossover rate 1), greedy one-to-one
replacement, no elitism. Trial vectors are projected onto the box of valid
pixels before they are evaluated and stored, so every population member decodes
to the candidate it was scored as. Decoding takes the floor of row/col (clipped
to the image) and rounds the colours into 0..255.

The engine attacks many images at once in one jitted program: `S` slots per
device each hold one image's DE state; one step evaluates the candidates of all
slots in a single batched forward; a slot whose image succeeded (or ran out of
generations) is refilled from an on-device queue in the next step. Every random
draw of an image comes from `fold_in(fold_in(key, dataset_index), generation)`,
so its random draws do not depend on the slot count, the chunking or the devices.
(The model's float32 outputs may differ in the last bits between batch sizes on
some backends, so probabilities can differ at the 1e-7 level between different
slot counts per device; with the same slots per device results are bit-identical
whatever the chunking, resumes or number of devices and processes.)
The image axis is sharded over a `jax.sharding.Mesh`; each device runs its own
slots and queue, with no communication between devices.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from propmaps_jax.errors import PropmapsError
from propmaps_jax.perturb import apply_pixels_batch
from propmaps_jax.types import Images, LogitsFn, PRNGKey

# Number of candidate evaluations per device and step that the default slot count aims
# at: big enough to keep an accelerator busy with one forward per step.
DEFAULT_BATCH_PER_DEVICE = 32768
AXIS = "images"

# Incremented each time the engine's program is traced (tests check for recompiles).
TRACE_COUNT = 0


@dataclasses.dataclass(frozen=True)
class AttackConfig:
    """Settings of the attack; the defaults are those of Su et al. (k = 1)."""

    pixels: int = 1
    population: int = 400
    generations: int = 100
    differential_weight: float = 0.5
    crossover_rate: float = 1.0

    def __post_init__(self) -> None:
        if int(self.pixels) != self.pixels or self.pixels < 1:
            raise PropmapsError(
                f"pixels must be an integer >= 1 (pixels changed per image), "
                f"got {self.pixels}"
            )
        if int(self.population) != self.population or self.population < 4:
            raise PropmapsError(
                f"population must be an integer >= 4 (DE/rand/1 needs the member and "
                f"3 others), got {self.population}"
            )
        if int(self.generations) != self.generations or self.generations < 1:
            raise PropmapsError(
                f"generations must be an integer >= 1, got {self.generations}"
            )
        if not 0.0 < self.differential_weight <= 2.0:
            raise PropmapsError(
                f"differential_weight must be in (0, 2], got {self.differential_weight}"
            )
        if not 0.0 <= self.crossover_rate <= 1.0:
            raise PropmapsError(
                f"crossover_rate must be in [0, 1], got {self.crossover_rate}"
            )

    @property
    def num_dims(self) -> int:
        """Length of a candidate vector: 5 numbers per pixel."""
        return 5 * self.pixels

    def to_dict(self) -> dict[str, Any]:
        """The settings as a JSON-serialisable dict."""
        return dataclasses.asdict(self)


class AttackResult(NamedTuple):
    """Per attacked image (in input order), NumPy arrays."""

    success: np.ndarray  # bool (N,)
    pixels: np.ndarray  # int32 (N, k, 5): the adversarial / best candidate
    prob_true_after: np.ndarray  # float32 (N,): p(label) of that candidate
    pred_after: np.ndarray  # int32 (N,): predicted class of that candidate
    generations: np.ndarray  # int32 (N,): DE generations run (0: initial population)
    evaluations: np.ndarray  # int64 (N,): population * (generations + 1)


def concatenate_results(parts: Sequence[AttackResult]) -> AttackResult:
    """Join results of consecutive chunks."""
    return AttackResult(*(np.concatenate(field) for field in zip(*parts, strict=True)))


def make_de(config: AttackConfig) -> tuple[Any, Any]:
    """evosax DE and its params for DE/rand/1, no elitism, F and CR of `config`."""
    # Imported here: importing evosax.algorithms starts a JAX backend, which must
    # not happen before jax.distributed.initialize() in multi-host runs.
    from evosax.algorithms import DifferentialEvolution

    de = DifferentialEvolution(config.population, solution=jnp.zeros(config.num_dims))
    params = de.default_params.replace(
        elitism=False,
        crossover_rate=config.crossover_rate,
        differential_weight=config.differential_weight,
        # min == max turns dithering off: F is the constant differential_weight.
        differential_weight_min=config.differential_weight,
        differential_weight_max=config.differential_weight,
    )
    return de, params


def candidate_bounds(
    config: AttackConfig, image_shape: Sequence[int]
) -> tuple[jax.Array, jax.Array]:
    """(lower, upper) of candidate vectors: row in [0, H], col in [0, W], RGB 0..255."""
    height, width = image_shape[0], image_shape[1]
    lower = jnp.zeros((config.num_dims,), jnp.float32)
    upper = jnp.tile(
        jnp.asarray([height, width, 255.0, 255.0, 255.0], jnp.float32), config.pixels
    )
    return lower, upper


def decode_candidates(vectors: jax.Array, image_shape: Sequence[int]) -> jax.Array:
    """Real vectors (..., 5k) -> int32 pixels (..., k, 5): in the image, RGB 0..255."""
    vectors = jnp.asarray(vectors, jnp.float32)
    pixels = vectors.reshape(*vectors.shape[:-1], -1, 5)
    height, width = image_shape[0], image_shape[1]
    rows = jnp.clip(jnp.floor(pixels[..., 0]), 0, height - 1)
    cols = jnp.clip(jnp.floor(pixels[..., 1]), 0, width - 1)
    rgb = jnp.clip(jnp.round(pixels[..., 2:5]), 0, 255)
    return jnp.concatenate([rows[..., None], cols[..., None], rgb], -1).astype(
        jnp.int32
    )


def initial_population(
    key: PRNGKey, config: AttackConfig, image_shape: Sequence[int]
) -> jax.Array:
    """(population, 5k): row/col uniform over the image, RGB ~ N(128, 127) clipped."""
    key_pos, key_rgb = jax.random.split(key)
    shape = (config.population, config.pixels)
    height, width = image_shape[0], image_shape[1]
    unit = jax.random.uniform(key_pos, (*shape, 2))
    positions = unit * jnp.asarray([height, width], jnp.float32)
    rgb = jnp.clip(128.0 + 127.0 * jax.random.normal(key_rgb, (*shape, 3)), 0, 255)
    return jnp.concatenate([positions, rgb], -1).reshape(config.population, -1)


def fitness(
    logits: jax.Array, labels: jax.Array, targets: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(fitness, success, p(label), prediction) of logits (..., C).

    `labels`, `targets` broadcast against logits[..., 0]; a target < 0 means
    untargeted: fitness p(label), success when argmax != label; otherwise fitness
    1 - p(target), success when argmax == target. Fitness is minimised.
    """
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    pred = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    prob_true = jnp.take_along_axis(
        probs, jnp.broadcast_to(labels, pred.shape)[..., None], -1
    )[..., 0]
    targeted = targets >= 0
    safe_targets = jnp.broadcast_to(jnp.where(targeted, targets, 0), pred.shape)
    prob_target = jnp.take_along_axis(probs, safe_targets[..., None], -1)[..., 0]
    fit = jnp.where(targeted, 1.0 - prob_target, prob_true)
    success = jnp.where(targeted, pred == targets, pred != labels)
    return fit, success, prob_true, pred


def image_key(key: PRNGKey, dataset_index: jax.Array) -> PRNGKey:
    """The key of one image: every random draw of its attack derives from it."""
    return jax.random.fold_in(key, dataset_index)


def generation_key(key_of_image: PRNGKey, generation: jax.Array) -> PRNGKey:
    """Key of generation g of an image (0: the initial population)."""
    return jax.random.fold_in(key_of_image, generation)


def validate_inputs(
    images: np.ndarray,
    labels: np.ndarray,
    indices: np.ndarray,
    targets: np.ndarray | None,
    num_classes: int | None = None,
) -> None:
    """Raise PropmapsError unless images are uint8 (N, H, W, 3) with matching labels."""
    if not isinstance(images, np.ndarray | jax.Array) or images.dtype != np.uint8:
        raise PropmapsError(
            f"images must be a uint8 array (N, H, W, 3) with values 0..255, got "
            f"{getattr(images, 'dtype', type(images).__name__)}"
        )
    if images.ndim != 4 or images.shape[-1] != 3:
        raise PropmapsError(
            f"images must have shape (N, H, W, 3) (NHWC, RGB), got {images.shape}"
        )
    n = images.shape[0]
    for name, arr in (("labels", labels), ("indices", indices), ("targets", targets)):
        if arr is not None and np.shape(arr) != (n,):
            raise PropmapsError(
                f"{name} must have shape ({n},) to match the images, "
                f"got {np.shape(arr)}"
            )
    if (
        num_classes is not None
        and n
        and not (0 <= np.min(labels) <= np.max(labels) < num_classes)
    ):
        raise PropmapsError(f"labels must be in 0..{num_classes - 1}")
    if len(np.unique(indices)) != n:
        raise PropmapsError(
            "indices must be distinct: they seed the per-image random keys"
        )
    if targets is not None:
        targets = np.asarray(targets)
        if num_classes is not None and np.any(targets >= num_classes):
            raise PropmapsError(f"targets must be in 0..{num_classes - 1}")
        clash = np.flatnonzero((targets >= 0) & (targets == np.asarray(labels)))
        if clash.size:
            raise PropmapsError(
                f"target class equals the true label for {clash.size} image(s) "
                f"(first: dataset index {int(np.asarray(indices)[clash[0]])}); "
                "leave those images out of a targeted attack"
            )


@struct.dataclass
class _SlotState:
    """State of one device: its slots, their DE states, and its results buffer."""

    slot_pos: jax.Array  # (S,) queue position held by the slot, -1: empty
    slot_gen: jax.Array  # (S,) DE generations done by the slot's image
    de_state: Any  # evosax State, leaves (S, ...)
    pop_prob_true: jax.Array  # (S, P) p(label) of each population member
    pop_pred: jax.Array  # (S, P) prediction of each population member
    next_pos: jax.Array  # () next queue position to load
    res_success: jax.Array  # (Q,)
    res_pixels: jax.Array  # (Q, k, 5)
    res_prob_true: jax.Array  # (Q,)
    res_pred: jax.Array  # (Q,)
    res_generations: jax.Array  # (Q,)


def _engine_functions(
    logits_fn: LogitsFn,
    config: AttackConfig,
    image_shape: tuple[int, int, int],
    slots: int,
    queue_len: int,
):
    """The per-device init and run functions (local arrays, no device axis)."""
    de, params = make_de(config)
    lower, upper = candidate_bounds(config, image_shape)
    pop, k = config.population, config.pixels

    def init_state(next_pos: jax.Array) -> _SlotState:
        zeros = jnp.zeros((slots, pop, config.num_dims), jnp.float32)
        keys = jax.random.split(jax.random.key(0), slots)
        de_state = jax.vmap(de.init, (0, 0, 0, None))(
            keys, zeros, jnp.zeros((slots, pop)), params
        )
        return _SlotState(
            slot_pos=jnp.full((slots,), -1, jnp.int32),
            slot_gen=jnp.zeros((slots,), jnp.int32),
            de_state=de_state,
            pop_prob_true=jnp.zeros((slots, pop), jnp.float32),
            pop_pred=jnp.zeros((slots, pop), jnp.int32),
            next_pos=next_pos.astype(jnp.int32),
            res_success=jnp.zeros((queue_len,), bool),
            res_pixels=jnp.full((queue_len, k, 5), -1, jnp.int32),
            res_prob_true=jnp.full((queue_len,), jnp.nan, jnp.float32),
            res_pred=jnp.full((queue_len,), -1, jnp.int32),
            res_generations=jnp.full((queue_len,), -1, jnp.int32),
        )

    def step(key, queue, queue_size, state: _SlotState) -> _SlotState:
        q_images, q_labels, q_targets, q_indices = queue
        # Refill empty slots, in slot order, with the next images of the queue.
        empty = state.slot_pos < 0
        new_pos = state.next_pos + jnp.cumsum(empty) - 1
        load = empty & (new_pos < queue_size)
        slot_pos = jnp.where(load, new_pos, state.slot_pos)
        next_pos = state.next_pos + jnp.sum(load, dtype=jnp.int32)
        active = slot_pos >= 0
        fresh = load

        at = jnp.where(active, slot_pos, 0)
        images = q_images[at]
        labels, targets = q_labels[at], q_targets[at]
        keys = jax.vmap(image_key, (None, 0))(key, q_indices[at])
        generation = jnp.where(fresh, 0, state.slot_gen + 1)
        gen_keys = jax.vmap(generation_key)(keys, generation)

        init_pop = jax.vmap(initial_population, (0, None, None))(
            gen_keys, config, image_shape
        )
        trial, _ = jax.vmap(de.ask, (0, 0, None))(gen_keys, state.de_state, params)
        trial = jnp.clip(trial, lower, upper)
        candidates = jnp.where(fresh[:, None, None], init_pop, trial)
        pixels = decode_candidates(candidates, image_shape)  # (S, P, k, 5)

        batch = jnp.broadcast_to(images[:, None], (slots, pop, *image_shape))
        adversarial = apply_pixels_batch(
            batch.reshape(slots * pop, *image_shape), pixels.reshape(-1, k, 5)
        )
        logits = logits_fn(adversarial).reshape(slots, pop, -1)
        fit, success, prob_true, pred = fitness(
            logits, labels[:, None], targets[:, None]
        )

        started = jax.vmap(de.init, (0, 0, 0, None))(gen_keys, candidates, fit, params)
        told, _ = jax.vmap(de.tell, (0, 0, 0, 0, None))(
            gen_keys, candidates, fit, state.de_state, params
        )
        de_state = jax.tree_util.tree_map(
            lambda a, b: jnp.where(fresh.reshape((-1,) + (1,) * (a.ndim - 1)), a, b),
            started,
            told,
        )
        # Mirror evosax's greedy replacement (trial kept when fitness <= parent's).
        keep_new = fresh[:, None] | (fit <= state.de_state.fitness)
        pop_prob_true = jnp.where(keep_new, prob_true, state.pop_prob_true)
        pop_pred = jnp.where(keep_new, pred, state.pop_pred)

        any_success = jnp.any(success, axis=1) & active
        finished = active & (any_success | (generation >= config.generations))
        # The adversarial example: the most confident successful candidate; for a
        # failure the best member of the final population.
        success_at = jnp.argmin(jnp.where(success, fit, jnp.inf), axis=1)
        best_at = jnp.argmin(de_state.fitness, axis=1)
        rows = jnp.arange(slots)
        best_pixels = decode_candidates(de_state.population[rows, best_at], image_shape)
        out_pixels = jnp.where(
            any_success[:, None, None], pixels[rows, success_at], best_pixels
        )
        out_prob = jnp.where(
            any_success, prob_true[rows, success_at], pop_prob_true[rows, best_at]
        )
        out_pred = jnp.where(
            any_success, pred[rows, success_at], pop_pred[rows, best_at]
        )
        write = jnp.where(finished, slot_pos, queue_len)  # out of range: dropped

        return _SlotState(
            slot_pos=jnp.where(finished, -1, slot_pos),
            slot_gen=generation,
            de_state=de_state,
            pop_prob_true=pop_prob_true,
            pop_pred=pop_pred,
            next_pos=next_pos,
            res_success=state.res_success.at[write].set(any_success, mode="drop"),
            res_pixels=state.res_pixels.at[write].set(out_pixels, mode="drop"),
            res_prob_true=state.res_prob_true.at[write].set(out_prob, mode="drop"),
            res_pred=state.res_pred.at[write].set(out_pred, mode="drop"),
            res_generations=state.res_generations.at[write].set(
                generation, mode="drop"
            ),
        )

    def run(key, queue, queue_size, bound, max_steps, state: _SlotState) -> _SlotState:
        """Steps until every queue position < bound is finished, or max_steps steps.

        Stopping after max_steps and calling again continues the same sequence of
        steps, so the results do not depend on max_steps.
        """
        global TRACE_COUNT
        TRACE_COUNT += 1

        def unfinished(carry):
            state, steps = carry
            pending = (state.slot_pos >= 0) & (state.slot_pos < bound)
            return ((state.next_pos < bound) | jnp.any(pending)) & (steps < max_steps)

        def body(carry):
            state, steps = carry
            return step(key, queue, queue_size, state), steps + 1

        state, _ = jax.lax.while_loop(unfinished, body, (state, jnp.int32(0)))
        return state

    return init_state, run


def default_slots(population: int, num_images: int, num_devices: int) -> int:
    """Slots per device: about DEFAULT_BATCH_PER_DEVICE evaluations per step."""
    per_device = math.ceil(num_images / num_devices)
    return max(1, min(per_device, math.ceil(DEFAULT_BATCH_PER_DEVICE / population)))


def _local_len(positions: int, devices: int) -> int:
    """Queue length per device (position g goes to device g % n, local slot g // n)."""
    return max(1, math.ceil(positions / devices))


def attack_stream(
    logits_fn: LogitsFn,
    images: Images,
    labels: np.ndarray,
    indices: np.ndarray,
    key: PRNGKey,
    config: AttackConfig,
    *,
    targets: np.ndarray | None = None,
    slots: int | None = None,
    chunk_ends: Sequence[int] | None = None,
    start: int = 0,
    capacity: int | None = None,
    mesh: Mesh | None = None,
    num_classes: int | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    progress_every_s: float = 10.0,
) -> Iterator[AttackResult]:
    """Attack every image; an iterator over the results chunk by chunk, in input order.

    Inputs are checked (PropmapsError) when called; the work runs while iterating.

    Args:
      logits_fn: images float32 (N, H, W, 3) in 0..255 -> logits (N, C).
      images: uint8 (N, H, W, 3), correctly classified images to attack.
      labels, indices: (N,) true classes and dataset indices (seed the keys).
      key: the attack's PRNG key.
      config: population, generations, pixels...
      targets: (N,) target classes (targeted attack), or None / -1 for untargeted.
      slots: images attacked at once over all devices (rounded up to a multiple of
        the device count); default about 32768 / population per device.
      chunk_ends: increasing end positions; one AttackResult is yielded for each
        [previous end, end). Default: one chunk of all images.
      start: attack only images [start, N) (resuming a run; the program and so
        the compiled code stay the same as for a run from 0).
      capacity: queue length to compile for (>= N); runs with the same capacity
        share one compiled program whatever their N (e.g. targets, resumes).
      mesh: a 1-D mesh whose devices share the images; default all devices.
      num_classes: checks labels/targets against it when given.
      on_progress: called as on_progress(finished, successes) about every
        `progress_every_s` seconds while a chunk runs, with the images of this
        call finished so far (in any order) and their successes. Without it each
        chunk runs in one device call and the next chunk is dispatched before the
        previous one is read. Results are the same either way.
    """
    images = np.asarray(images) if not isinstance(images, np.ndarray) else images
    labels = np.asarray(labels, np.int32)
    indices = np.asarray(indices, np.int32)
    targets = (
        np.full(labels.shape, -1, np.int32)
        if targets is None
        else np.asarray(targets, np.int32)
    )
    validate_inputs(images, labels, indices, targets, num_classes)
    n = images.shape[0]
    chunk_ends = [n] if chunk_ends is None else [int(e) for e in chunk_ends]
    if not 0 <= start <= n:
        raise PropmapsError(f"start must be in 0..{n}, got {start}")
    if any(b < a for a, b in zip([start] + chunk_ends, chunk_ends, strict=False)) or (
        chunk_ends and chunk_ends[-1] != n
    ):
        raise PropmapsError(
            f"chunk_ends must increase from start ({start}) to the number of "
            f"images ({n})"
        )
    if n == 0 or start == n:
        return iter([_empty_result(config) for _ in chunk_ends])

    if mesh is None:
        mesh = Mesh(np.asarray(jax.devices()), (AXIS,))
    num_devices = mesh.devices.size
    axis = mesh.axis_names[0]
    if slots is None:
        per_device = default_slots(config.population, n, num_devices)
    else:
        if slots < 1:
            raise PropmapsError(f"slots must be >= 1, got {slots}")
        per_device = math.ceil(slots / num_devices)
    local_len = _local_len(max(n, capacity or 0), num_devices)
    image_shape = tuple(int(s) for s in images.shape[1:])

    def to_device_major(arr: np.ndarray, fill: Any) -> np.ndarray:
        padded = np.full((local_len * num_devices, *arr.shape[1:]), fill, arr.dtype)
        # Entries past n are never loaded: each device's queue size stops before.
        padded[:n] = arr
        # (local position, device) -> (device, local position)
        return np.swapaxes(padded.reshape(local_len, num_devices, *arr.shape[1:]), 0, 1)

    sharded = NamedSharding(mesh, PartitionSpec(axis))
    replicated = NamedSharding(mesh, PartitionSpec())

    def put(arr: np.ndarray, sharding: NamedSharding) -> jax.Array:
        return jax.make_array_from_callback(arr.shape, sharding, lambda i: arr[i])

    program, init_program = _build_programs(
        logits_fn,
        config,
        image_shape,
        per_device,
        local_len,
        mesh,
        str(jax.random.key_impl(key)),
    )
    queue = tuple(
        put(to_device_major(a, f), sharded)
        for a, f in ((images, 0), (labels, 0), (targets, -1), (indices, 0))
    )
    key_data = put(np.asarray(jax.random.key_data(key)), replicated)

    def host_counts(end: int) -> np.ndarray:
        """Per device, how many of the queue positions < end it holds."""
        return np.asarray(
            [len(range(d, end, num_devices)) for d in range(num_devices)], np.int32
        )

    def local_counts(end: int) -> jax.Array:
        return put(host_counts(end), sharded)

    queue_size = local_counts(n)
    state = init_program(local_counts(start))
    call = functools.partial(program, key_data, queue, queue_size)
    if on_progress is None:
        run_all = put(np.asarray(np.iinfo(np.int32).max, np.int32), replicated)
        return _run_chunks(
            call,
            run_all,
            state,
            local_counts,
            chunk_ends,
            start,
            n,
            config,
        )
    return _run_chunks_with_progress(
        call,
        lambda steps: put(np.asarray(steps, np.int32), replicated),
        state,
        local_counts,
        host_counts,
        chunk_ends,
        start,
        n,
        config,
        on_progress,
        progress_every_s,
    )


def _run_chunks(
    program,
    run_all,
    state,
    local_counts,
    chunk_ends,
    start,
    n,
    config,
) -> Iterator[AttackResult]:
    """Run the program chunk by chunk, yielding each chunk's results in order."""
    pending = None
    for end in chunk_ends:
        state = program(local_counts(end), run_all, state)
        # Dispatch is asynchronous: the next chunk is queued before this one is read.
        if pending is not None:
            yield _fetch(*pending)
        pending = (state, start, end, n, config)
        start = end
    if pending is not None:
        yield _fetch(*pending)


def _run_chunks_with_progress(
    program,
    put_steps,
    state,
    local_counts,
    host_counts,
    chunk_ends,
    start,
    n,
    config,
    on_progress,
    progress_every_s,
) -> Iterator[AttackResult]:
    """Like `_run_chunks`, in device calls of a bounded number of DE steps.

    The number of steps per call is adapted so that a call takes about
    `progress_every_s` seconds; between calls `on_progress` is told how many images
    are finished. Stopping and continuing the loop does not change any result.
    """
    steps, last = 1, time.time()
    for end in chunk_ends:
        bound, bound_host = local_counts(end), host_counts(end)
        while True:
            tick = time.time()
            state = program(bound, put_steps(steps), state)
            slot_pos = _gather(state.slot_pos)  # (devices, slots); syncs
            next_pos = _gather(state.next_pos)
            elapsed = max(time.time() - tick, 1e-6)
            pending = (slot_pos >= 0) & (slot_pos < bound_host[:, None])
            if not (np.any(next_pos < bound_host) or np.any(pending)):
                break
            # Aim at one call per progress interval (at most 8x more steps a time).
            steps = int(min(max(1, steps * progress_every_s / elapsed), 8 * steps))
            if time.time() - last >= progress_every_s:
                last = time.time()
                finished = _gather(state.res_generations) >= 0
                on_progress(
                    int(finished.sum()), int(_gather(state.res_success)[finished].sum())
                )
        yield _fetch(state, start, end, n, config)
        start = end


@functools.lru_cache(maxsize=8)
def _build_programs(
    logits_fn: LogitsFn,
    config: AttackConfig,
    image_shape: tuple[int, int, int],
    per_device: int,
    local_len: int,
    mesh: Mesh,
    key_impl: str,
):
    """The jitted (run, init) programs over the mesh, cached to avoid recompiles."""
    init_state, run = _engine_functions(
        logits_fn, config, image_shape, per_device, local_len
    )
    axis = mesh.axis_names[0]
    spec = PartitionSpec(axis)

    def squeeze(tree):
        return jax.tree_util.tree_map(lambda x: x[0], tree)

    def expand(tree):
        return jax.tree_util.tree_map(lambda x: x[None], tree)

    def run_local(key_data, queue, queue_size, bound, max_steps, state):
        key = jax.random.wrap_key_data(key_data, impl=key_impl)
        out = run(
            key, squeeze(queue), queue_size[0], bound[0], max_steps, squeeze(state)
        )
        return expand(out)

    program = jax.jit(
        jax.shard_map(
            run_local,
            mesh=mesh,
            in_specs=(PartitionSpec(), spec, spec, spec, PartitionSpec(), spec),
            out_specs=spec,
            check_vma=False,
        )
    )
    init_program = jax.jit(
        jax.shard_map(
            lambda next_pos: expand(init_state(next_pos[0])),
            mesh=mesh,
            in_specs=(spec,),
            out_specs=spec,
            check_vma=False,
        )
    )
    return program, init_program


def _gather(arr: jax.Array) -> np.ndarray:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(arr, tiled=True))
    return np.asarray(arr)


def _fetch(
    state: _SlotState, start: int, end: int, n: int, config: AttackConfig
) -> AttackResult:
    """Results of queue positions [start, end) in input order, from (device, local)."""

    def ordered(arr: jax.Array) -> np.ndarray:
        arr = _gather(arr)
        arr = np.swapaxes(arr, 0, 1).reshape(-1, *arr.shape[2:])[:n]
        return arr[start:end]

    generations = ordered(state.res_generations).astype(np.int32)
    return AttackResult(
        success=ordered(state.res_success).astype(bool),
        pixels=ordered(state.res_pixels).astype(np.int32),
        prob_true_after=ordered(state.res_prob_true).astype(np.float32),
        pred_after=ordered(state.res_pred).astype(np.int32),
        generations=generations,
        evaluations=config.population * (generations.astype(np.int64) + 1),
    )


def _empty_result(config: AttackConfig) -> AttackResult:
    return AttackResult(
        np.zeros(0, bool),
        np.zeros((0, config.pixels, 5), np.int32),
        np.zeros(0, np.float32),
        np.zeros(0, np.int32),
        np.zeros(0, np.int32),
        np.zeros(0, np.int64),
    )


def attack(
    logits_fn: LogitsFn,
    images: Images,
    labels: np.ndarray,
    indices: np.ndarray,
    key: PRNGKey,
    config: AttackConfig,
    **kwargs: Any,
) -> AttackResult:
    """All results of `attack_stream` at once (same arguments)."""
    return concatenate_results(
        list(attack_stream(logits_fn, images, labels, indices, key, config, **kwargs))
    )
