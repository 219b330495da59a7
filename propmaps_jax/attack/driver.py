"""The one-pixel attack (Su et al.) of many images: the host driver.

The attack lives in three rooms: `attack_de` holds the settings, the differential
evolution pieces, the per-image keys and `attack_image` (the whole attack of one
image, pure); `attack_engine` runs the same steps for many images at once in one
jitted slot loop per device; this module checks the inputs, lays the images out
over a `jax.sharding.Mesh`, runs the engine chunk by chunk (resumable, with
progress) and returns NumPy results in input order.

Every random draw of an image comes from `fold_in(fold_in(key, dataset_index),
generation)`, so results do not depend on the slot count, the chunking or the
devices (see `attack_engine` for the last-bit caveat between slot counts).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from propmaps_jax import backend, memory, models
from propmaps_jax.attack import engine as attack_engine
from propmaps_jax.attack.de import AttackConfig
from propmaps_jax.errors import PropmapsError
from propmaps_jax.types import ApplyFn, Images, PRNGKey, Variables

# Number of candidate evaluations per device and step that the default slot count aims
# at: on an accelerator, big enough to keep it busy with one forward per step; on a
# CPU, the knee of the models' batched forward throughput (it falls beyond, see
# BENCHMARKS.md), so one slot at the paper's population of 400.
DEFAULT_BATCH_PER_DEVICE = 32768
DEFAULT_BATCH_PER_CPU = 512
# On a CPU, for a model the project does not know (`is_project_model` false): a
# small model's forward no longer outweighs the attack's own work per step (DE,
# bookkeeping), so more images per step pay. Measured 2026-12-07 on the 2-core CPU
# (shared with other jobs; min of 2-3 interleaved runs) with the README's tiny CNN
# (two 8-channel convolutions), population 400: 8 images x 21 generations took
# 12.0 s at 1 slot, 8.8 s at 4, 7.9 s at 8; 32 images x 11 generations 20.2 s at 1,
# 17.4 s at 8, 17.2 s at 16, 19.7 s at 32. 4096 candidates (10 slots at 400) sits
# between the two best. Most of the time is the work itself: a failed attack
# evaluates population x (generations + 1) candidates whatever the slots.
DEFAULT_BATCH_PER_CPU_OTHER_MODEL = 4096
AXIS = "images"


class ProgressInfo(NamedTuple):
    """What `attack_stream`'s `on_progress` is told while a chunk runs.

    Counts are over the images of this call (from `start` on), in any order.
    """

    finished: int  # images finished
    successes: int  # of those, successful
    evaluations: int  # model evaluations so far, finished and running images
    running_generations: np.ndarray  # (running,) DE generations each has done
    remaining: int  # images not started yet
    total: int  # images of this call
    max_generations: int  # config.generations: a running image's last generation
    engine_evaluations: int  # candidates the engine's forwards ran, idle slots too


class AttackResult(NamedTuple):
    """Per attacked image (in input order), NumPy arrays."""

    success: np.ndarray  # bool (N,)
    pixels: np.ndarray  # int32 (N, k, 5): the adversarial / best candidate
    prob_true_after: np.ndarray  # float32 (N,): p(label) of that candidate
    pred_after: np.ndarray  # int32 (N,): predicted class of that candidate
    generations: np.ndarray  # int32 (N,): DE generations run (0: initial population)
    evaluations: np.ndarray  # int64 (N,): population * (generations + 1)
    # int32 (N,): successes of search_apply_fn that apply_fn rejected (0 without it)
    search_rejections: np.ndarray


def concatenate_results(parts: Sequence[AttackResult]) -> AttackResult:
    """Join results of consecutive chunks."""
    return AttackResult(*(np.concatenate(field) for field in zip(*parts, strict=True)))


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


def default_slots(
    population: int,
    num_images: int,
    num_devices: int,
    platform: str | None = None,
    *,
    memory_bytes: int | None = None,
    estimate: memory.AttackMemory | None = None,
    project_model: bool = True,
) -> int:
    """Slots per device: about the backend's default batch of evaluations per step.

    `platform`: "cpu", "gpu", "tpu"... (default: JAX's default backend). Where
    `backend.enabled("small_batch")` (CPU) the batch is DEFAULT_BATCH_PER_CPU (at
    least one image's population), DEFAULT_BATCH_PER_CPU_OTHER_MODEL for a model
    the project does not know (`project_model` false), elsewhere
    DEFAULT_BATCH_PER_DEVICE, lowered where the device's memory is known
    (`memory_bytes`, e.g. `backend.device_memory_limit`) to what fits in
    `memory.MEMORY_FRACTION` of it by `estimate` (`memory.attack_memory`); never
    more slots than images per device.
    """
    per_device = math.ceil(num_images / num_devices)
    if backend.enabled("small_batch", platform):
        batch = (
            DEFAULT_BATCH_PER_CPU
            if project_model
            else DEFAULT_BATCH_PER_CPU_OTHER_MODEL
        )
        wanted = max(1, batch // population)
    else:
        wanted = math.ceil(DEFAULT_BATCH_PER_DEVICE / population)
    if memory_bytes is not None and estimate is not None:
        wanted = min(wanted, memory.slots_that_fit(memory_bytes, estimate, population))
    return max(1, min(per_device, wanted))


def is_project_model(apply_fn: ApplyFn) -> bool:
    """Whether `apply_fn` is the inference forward of a module class of
    `propmaps_jax.models` (whose CPU batch was measured, see BENCHMARKS.md)."""
    return isinstance(apply_fn, models.InferenceApply) and type(
        apply_fn.module
    ).__module__.startswith("propmaps_jax.")


def memory_estimate(
    apply_fn: ApplyFn,
    variables: Variables,
    config: AttackConfig,
    slots: int,
    num_images: int,
    *,
    mesh: Mesh | None = None,
    image_shape: Sequence[int] = (32, 32, 3),
) -> tuple[memory.AttackMemory, int | None]:
    """(estimated memory of one device, the device's memory limit or None where JAX
    does not report it) for attacking `num_images` with `slots` slots over the
    mesh's devices (default all), `apply_fn` as the search forward.

    An estimate (see `memory`): compare its `total` with the limit, keeping a
    margin (`memory.MEMORY_FRACTION`); traced, never compiled or run.
    """
    mesh = _default_mesh() if mesh is None else mesh
    devices = mesh.devices.size
    estimate = memory.attack_memory(
        apply_fn,
        variables,
        math.ceil(slots / devices),
        config.population,
        _local_len(num_images, devices),
        image_shape,
        config.pixels,
    )
    return estimate, backend.device_memory_limit(mesh.devices.flat[0])


def default_candidate_forward(
    apply_fn: ApplyFn,
    search_apply_fn: ApplyFn | None,
    config: AttackConfig,
    platform: str,
) -> attack_engine.CandidateForward | None:
    """The receptive-field forward where `backend.enabled("receptive_forward",
    platform)`, else None (the plain forward): for a `models.InferenceApply` of a
    model that `receptive` supports, one pixel per candidate, no separate search
    forward."""
    if search_apply_fn is not None or not isinstance(apply_fn, models.InferenceApply):
        return None
    if not backend.enabled("receptive_forward", platform):
        return None
    from propmaps_jax.models import receptive

    return receptive.make_candidate_forward(apply_fn.module, config.pixels)


def _default_mesh() -> Mesh:
    return Mesh(np.asarray(jax.devices()), (AXIS,))


def _local_len(positions: int, devices: int) -> int:
    """Queue length per device (position g goes to device g % n, local slot g // n),
    rounded up to a power of two: runs of a similar number of images share one
    compiled program (the queue's shape is part of it). Positions past N are never
    loaded, so the results do not depend on it; the queue holds an image and a few
    numbers per position, small beside the search's state."""
    need = max(1, math.ceil(positions / devices))
    return 1 << (need - 1).bit_length()


def attack_stream(
    apply_fn: ApplyFn,
    variables: Variables,
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
    on_progress: Callable[[ProgressInfo], None] | None = None,
    progress_every_s: float = 10.0,
    search_apply_fn: ApplyFn | None = None,
    candidate_forward: attack_engine.CandidateForward | str | None = "auto",
) -> Iterator[AttackResult]:
    """Attack every image; an iterator over the results chunk by chunk, in input order.

    Inputs are checked (PropmapsError) when called; the work runs while iterating.
    Image i gets the result of `attack_image(image_key(key, indices[i]), ...)`.

    Args:
      apply_fn: (variables, images float32 (N, H, W, 3) in 0..255) -> logits (N, C),
        hashable (e.g. `models.make_apply_fn(module)`); compiled programs are
        cached on it, so new variables for the same apply_fn never recompile.
      variables: the model's variables, replicated over the mesh.
      images: uint8 (N, H, W, 3), correctly classified images to attack.
      labels, indices: (N,) true classes and dataset indices (seed the keys).
      key: the attack's PRNG key.
      config: population, generations, pixels...
      targets: (N,) target classes (targeted attack), or None / -1 for untargeted.
      slots: images attacked at once over all devices (rounded up to a multiple of
        the device count); default `default_slots` (about 32768 / population per
        accelerator, fewer where that would not fit in half the device's memory
        by `memory_estimate`; 512 // population per CPU device, 4096 // population
        for a model the project does not know). Given, it is used as is.
      chunk_ends: increasing end positions; one AttackResult is yielded for each
        [previous end, end). Default: one chunk of all images.
      start: attack only images [start, N) (resuming a run; the program and so
        the compiled code stay the same as for a run from 0).
      capacity: queue length to compile for (>= N); runs with the same capacity
        share one compiled program whatever their N (e.g. targets, resumes).
        Either way the queue is rounded up to a power of two per device, so runs
        of similar sizes share one program too.
      mesh: a 1-D mesh whose devices share the images; default all devices.
      num_classes: checks labels/targets against it when given.
      on_progress: called as on_progress(info: ProgressInfo) about every
        `progress_every_s` seconds while a chunk runs (finished images, their
        successes, evaluations so far, running images' generations...). Without it each
        chunk runs in one device call and the next chunk is dispatched before the
        previous one is read. Results are the same either way.
      search_apply_fn: a cheaper forward for the search (e.g. the module with
        dtype=bfloat16, same variables); every reported number then comes from
        `apply_fn`, and a search success that `apply_fn` rejects is counted in
        `search_rejections` while that image's search goes on.
      candidate_forward: a faster exact forward of the candidates,
        `(variables, images (B, H, W, 3), pixels (B, P, k, 5)) -> logits (B * P, C)`
        (hashable; e.g. `receptive.make_candidate_forward(module, k)`), used in
        place of the search forward of the perturbed images; None: the model's
        own forward; "auto" (default): `default_candidate_forward`.

    When fewer images remain than slots, each step's forward runs only the active
    slots, in the smallest of a few compiled sizes (slots, halved down to 1)
    that holds them, where `backend.enabled("active_buckets")` (CPU).
    """
    images, labels, indices, targets = _checked_inputs(
        images, labels, indices, targets, num_classes
    )
    n = images.shape[0]
    chunk_ends = _checked_chunk_ends(chunk_ends, start, n)
    if n == 0 or start == n:
        return iter([_empty_result(config) for _ in chunk_ends])
    if isinstance(candidate_forward, str) and candidate_forward != "auto":
        raise PropmapsError(
            f"candidate_forward must be a function, None or 'auto', got "
            f"{candidate_forward!r}"
        )
    mesh = _default_mesh() if mesh is None else mesh
    platform = backend.platform_of(mesh.devices.flat[0])
    if slots is None:
        slots = mesh.devices.size * _memory_aware_slots(
            search_apply_fn or apply_fn,
            variables,
            config,
            images.shape[1:],
            n,
            mesh,
            platform,
            is_project_model(apply_fn),
        )
    layout = _Layout.create(mesh, config, n, slots, capacity)
    if isinstance(candidate_forward, str):
        candidate_forward = default_candidate_forward(
            apply_fn, search_apply_fn, config, platform
        )
    program, init_program = attack_engine.build_programs(
        apply_fn,
        search_apply_fn,
        config,
        layout.slots,
        layout.local_len,
        layout.mesh,
        str(jax.random.key_impl(key)),
        candidate_forward,
        backend.enabled("active_buckets", platform),
    )
    queue = tuple(
        layout.put_sharded(layout.device_major(a, fill))
        for a, fill in ((images, 0), (labels, 0), (targets, -1), (indices, 0))
    )
    call = functools.partial(
        program,
        layout.put_replicated(np.asarray(jax.random.key_data(key))),
        jax.tree_util.tree_map(layout.put_replicated, variables),
        queue,
        layout.local_counts(n),
    )
    state = init_program(layout.local_counts(start))
    if on_progress is None:
        run_all = layout.put_replicated(np.asarray(np.iinfo(np.int32).max, np.int32))
        return _run_chunks(call, run_all, state, layout, chunk_ends, start, n, config)
    return _run_chunks_with_progress(
        call,
        state,
        layout,
        chunk_ends,
        start,
        n,
        config,
        on_progress,
        progress_every_s,
    )


def _memory_aware_slots(
    apply_fn, variables, config, image_shape, n, mesh, platform, project_model
) -> int:
    """`default_slots` per device, lowered to fit the device's memory where JAX
    reports it (not on a CPU)."""
    devices = mesh.devices.size
    limit = backend.device_memory_limit(mesh.devices.flat[0])
    estimate = None
    if limit is not None:
        estimate, _ = memory_estimate(
            apply_fn, variables, config, 1, n, mesh=mesh, image_shape=image_shape
        )
    return default_slots(
        config.population,
        n,
        devices,
        platform,
        memory_bytes=limit,
        estimate=estimate,
        project_model=project_model,
    )


def _checked_inputs(images, labels, indices, targets, num_classes):
    """(images, labels, indices, targets) as NumPy arrays, checked."""
    images = np.asarray(images) if not isinstance(images, np.ndarray) else images
    labels = np.asarray(labels, np.int32)
    indices = np.asarray(indices, np.int32)
    targets = (
        np.full(labels.shape, -1, np.int32)
        if targets is None
        else np.asarray(targets, np.int32)
    )
    validate_inputs(images, labels, indices, targets, num_classes)
    return images, labels, indices, targets


def _checked_chunk_ends(chunk_ends, start: int, n: int) -> list[int]:
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
    return chunk_ends


@dataclasses.dataclass(frozen=True)
class _Layout:
    """How the queue is laid out over the mesh: position g on device g % devices."""

    mesh: Mesh
    slots: int  # per device
    local_len: int  # queue length per device

    @classmethod
    def create(cls, mesh, config, n, slots, capacity) -> _Layout:
        num_devices = mesh.devices.size
        if slots < 1:
            raise PropmapsError(f"slots must be >= 1, got {slots}")
        per_device = math.ceil(slots / num_devices)
        return cls(mesh, per_device, _local_len(max(n, capacity or 0), num_devices))

    @property
    def num_devices(self) -> int:
        return self.mesh.devices.size

    def device_major(self, arr: np.ndarray, fill: Any) -> np.ndarray:
        """(positions, ...) -> (devices, local positions, ...), padded with `fill`."""
        devices, local_len = self.num_devices, self.local_len
        padded = np.full((local_len * devices, *arr.shape[1:]), fill, arr.dtype)
        # Entries past n are never loaded: each device's queue size stops before.
        padded[: len(arr)] = arr
        return np.swapaxes(padded.reshape(local_len, devices, *arr.shape[1:]), 0, 1)

    def _put(self, arr: np.ndarray, spec: PartitionSpec) -> jax.Array:
        arr = np.asarray(arr)
        sharding = NamedSharding(self.mesh, spec)
        return jax.make_array_from_callback(arr.shape, sharding, lambda i: arr[i])

    def put_sharded(self, arr: np.ndarray) -> jax.Array:
        return self._put(arr, PartitionSpec(self.mesh.axis_names[0]))

    def put_replicated(self, arr: Any) -> jax.Array:
        return self._put(arr, PartitionSpec())

    def host_counts(self, end: int) -> np.ndarray:
        """Per device, how many of the queue positions < end it holds."""
        devices = self.num_devices
        return np.asarray(
            [len(range(d, end, devices)) for d in range(devices)], np.int32
        )

    def local_counts(self, end: int) -> jax.Array:
        return self.put_sharded(self.host_counts(end))


def _run_chunks(
    program,
    run_all,
    state,
    layout,
    chunk_ends,
    start,
    n,
    config,
) -> Iterator[AttackResult]:
    """Run the program chunk by chunk, yielding each chunk's results in order."""
    pending = None
    for end in chunk_ends:
        state = program(layout.local_counts(end), run_all, state)
        # Dispatch is asynchronous: the next chunk is queued before this one is read.
        if pending is not None:
            yield _fetch(*pending)
        pending = (state, start, end, n, config)
        start = end
    if pending is not None:
        yield _fetch(*pending)


def _run_chunks_with_progress(
    program,
    state,
    layout,
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
    steps, last, start0 = 1, time.time(), start
    for end in chunk_ends:
        bound, bound_host = layout.local_counts(end), layout.host_counts(end)
        while True:
            tick = time.time()
            state = program(bound, layout.put_replicated(np.int32(steps)), state)
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
                on_progress(
                    _progress_info(state, slot_pos, next_pos, layout, n, start0, config)
                )
        yield _fetch(state, start, end, n, config)
        start = end


def _progress_info(state, slot_pos, next_pos, layout, n, start, config) -> ProgressInfo:
    """ProgressInfo of the images [start, n) from a synced engine state."""
    generations = _gather(state.res_generations)
    finished = generations >= 0
    running = _gather(state.slot_gen)[slot_pos >= 0]
    queue_size = layout.host_counts(n)
    evaluations = config.population * (
        int((generations[finished].astype(np.int64) + 1).sum())
        + int((running.astype(np.int64) + 1).sum())
    )
    return ProgressInfo(
        finished=int(finished.sum()),
        successes=int(_gather(state.res_success)[finished].sum()),
        evaluations=evaluations,
        running_generations=running.astype(np.int32),
        remaining=int(np.maximum(queue_size - next_pos, 0).sum()),
        total=n - start,
        max_generations=config.generations,
        engine_evaluations=config.population * int(_gather(state.evaluated).sum()),
    )


def _gather(arr: jax.Array) -> np.ndarray:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(arr, tiled=True))
    return np.asarray(arr)


def _fetch(
    state: attack_engine.SlotState, start: int, end: int, n: int, config: AttackConfig
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
        search_rejections=ordered(state.res_rejections).astype(np.int32),
    )


def _empty_result(config: AttackConfig) -> AttackResult:
    return AttackResult(
        np.zeros(0, bool),
        np.zeros((0, config.pixels, 5), np.int32),
        np.zeros(0, np.float32),
        np.zeros(0, np.int32),
        np.zeros(0, np.int32),
        np.zeros(0, np.int64),
        np.zeros(0, np.int32),
    )


def attack(
    apply_fn: ApplyFn,
    variables: Variables,
    images: Images,
    labels: np.ndarray,
    indices: np.ndarray,
    key: PRNGKey,
    config: AttackConfig,
    **kwargs: Any,
) -> AttackResult:
    """All results of `attack_stream` at once (same arguments)."""
    return concatenate_results(
        list(
            attack_stream(
                apply_fn, variables, images, labels, indices, key, config, **kwargs
            )
        )
    )
