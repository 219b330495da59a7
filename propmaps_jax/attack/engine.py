"""The slot engine: `attack_de.attack_image` made fast for many images on each device.

`S` slots per device each hold one image's DE state; one step evaluates the
candidates of all slots in a single batched forward; a slot whose image succeeded
(or ran out of generations) is refilled from an on-device queue in the next step.
A step runs, per slot, the steps of `attack_image` (`propose`, `score`,
`update_search`, `outcome`) with the same keys, so an image's result does not
depend on the slot count, the chunking or the devices. (The model's float32
outputs may differ in the last bits between batch sizes on some backends, so
probabilities can differ at the 1e-7 level between different slot counts per
device; with the same slots per device results are bit-identical whatever the
chunking, resumes or number of devices and processes.)

The image axis is sharded over a `jax.sharding.Mesh`; each device runs its own
slots and queue, with no communication between devices. The model's variables are
an argument of the program, replicated over the mesh: programs are cached on what
decides them (apply_fn, config, shapes, mesh), never on the weights.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import Mesh, PartitionSpec

from propmaps_jax.attack import de as attack_de
from propmaps_jax.attack.de import AttackConfig, SearchState
from propmaps_jax.types import ApplyFn

# (variables, images (B, H, W, 3), pixels (B, P, k, 5)) -> logits (B * P, C).
CandidateForward = Callable[[Any, jax.Array, jax.Array], jax.Array]

# Incremented each time the engine's program is traced (tests check for recompiles).
TRACE_COUNT = 0


class SlotState(struct.PyTreeNode):
    """State of one device: its slots, their searches, and its results buffer."""

    slot_pos: jax.Array  # (S,) queue position held by the slot, -1: empty
    slot_gen: jax.Array  # (S,) DE generations done by the slot's image
    search: SearchState  # leaves (S, ...)
    next_pos: jax.Array  # () next queue position to load
    res_success: jax.Array  # (Q,)
    res_pixels: jax.Array  # (Q, k, 5)
    res_prob_true: jax.Array  # (Q,)
    res_pred: jax.Array  # (Q,)
    res_generations: jax.Array  # (Q,)
    res_rejections: jax.Array  # (Q,) search successes the report forward rejected
    evaluated: jax.Array  # () slot-forwards run (active or not): the engine's work


def init_state(
    config: AttackConfig, slots: int, queue_len: int, next_pos: jax.Array
) -> SlotState:
    """Empty slots and results; loading starts at queue position `next_pos`."""
    search = jax.vmap(lambda _: attack_de.empty_search_state(config))(jnp.arange(slots))
    return SlotState(
        slot_pos=jnp.full((slots,), -1, jnp.int32),
        slot_gen=jnp.zeros((slots,), jnp.int32),
        search=search,
        next_pos=jnp.asarray(next_pos, jnp.int32),
        res_success=jnp.zeros((queue_len,), bool),
        res_pixels=jnp.full((queue_len, config.pixels, 5), -1, jnp.int32),
        res_prob_true=jnp.full((queue_len,), jnp.nan, jnp.float32),
        res_pred=jnp.full((queue_len,), -1, jnp.int32),
        res_generations=jnp.full((queue_len,), -1, jnp.int32),
        res_rejections=jnp.zeros((queue_len,), jnp.int32),
        evaluated=jnp.zeros((), jnp.int32),
    )


def _refill(state: SlotState, queue_size: jax.Array) -> tuple[jax.Array, ...]:
    """(slot_pos, next_pos, fresh): empty slots take, in slot order, the next images."""
    empty = state.slot_pos < 0
    new_pos = state.next_pos + jnp.cumsum(empty, dtype=jnp.int32) - 1
    load = empty & (new_pos < queue_size)
    slot_pos = jnp.where(load, new_pos, state.slot_pos)
    next_pos = state.next_pos + jnp.sum(load, dtype=jnp.int32)
    return slot_pos, next_pos, load


def _full_forward(
    search_fn: ApplyFn, variables: Any, images: jax.Array, pixels: jax.Array
) -> jax.Array:
    """The default candidate forward: logits (B * P, C) of images (B, H, W, 3)
    each with its candidates' pixels (B, P, k, 5), by the model's own forward."""
    return search_fn(variables, attack_de.perturbed_batch(images, pixels))


def buckets_of(slots: int) -> tuple[int, ...]:
    """The forward sizes compiled for `slots` slots: slots, halved down to 1."""
    sizes = [slots]
    while sizes[-1] > 1:
        sizes.append(-(-sizes[-1] // 2))
    return tuple(sizes)


def _active_forward(
    forward: CandidateForward,
    variables: Any,
    images: jax.Array,
    pixels: jax.Array,
    active: jax.Array,
    buckets: tuple[int, ...],
) -> tuple[jax.Array, jax.Array]:
    """(logits (S, P, C), slots evaluated): the forward of the active slots only.

    The active slots are gathered into the smallest compiled size (a bucket) that
    holds them, so that when fewer images than slots remain (the end of a run)
    the forward shrinks with them instead of evaluating idle slots. Inactive
    slots' logits are 0 (their scores are never used).
    """
    slots, population = pixels.shape[:2]

    def run(size: int):
        def branch(order):
            take = order[:size]
            logits = forward(variables, images[take], pixels[take])
            logits = logits.reshape(size, population, -1)
            full = jnp.zeros((slots, *logits.shape[1:]), logits.dtype)
            return full.at[take].set(logits), jnp.int32(size)

        return branch

    if len(buckets) == 1:
        logits = forward(variables, images, pixels).reshape(slots, population, -1)
        return jnp.where(active[:, None, None], logits, 0), jnp.int32(slots)
    count = jnp.sum(active, dtype=jnp.int32)
    # Active slots first, in slot order; the bucket: the smallest size >= count.
    order = jnp.argsort(jnp.logical_not(active), stable=True)
    sizes = jnp.asarray(buckets, jnp.int32)  # decreasing
    index = jnp.maximum(jnp.sum(sizes >= count, dtype=jnp.int32) - 1, 0)
    logits, work = jax.lax.switch(index, [run(size) for size in buckets], order)
    return jnp.where(active[:, None, None], logits, 0), work


def step(
    apply_fn: ApplyFn,
    search_apply_fn: ApplyFn | None,
    variables: Any,
    config: AttackConfig,
    key: jax.Array,
    queue: tuple[jax.Array, ...],
    queue_size: jax.Array,
    state: SlotState,
    candidate_forward: CandidateForward | None = None,
    buckets: tuple[int, ...] | None = None,
) -> SlotState:
    """One generation of every slot: refill, propose, one forward, update, write.

    With a `search_apply_fn` the batched forward is the search's and each slot's
    reported candidate is checked by `apply_fn` (see `attack_de.verdict`). A
    `candidate_forward` (e.g. `receptive.make_candidate_forward`) replaces the
    search's forward of the perturbed images; `buckets`: the forward sizes
    (default `buckets_of(slots)`).
    """
    q_images, q_labels, q_targets, q_indices = queue
    image_shape = tuple(q_images.shape[1:])
    slots, queue_len = state.slot_pos.shape[0], state.res_success.shape[0]
    buckets = buckets_of(slots) if buckets is None else buckets
    slot_pos, next_pos, fresh = _refill(state, queue_size)
    active = slot_pos >= 0
    at = jnp.where(active, slot_pos, 0)
    labels, targets = q_labels[at], q_targets[at]
    keys = jax.vmap(attack_de.image_key, (None, 0))(key, q_indices[at])
    generation = jnp.where(fresh, 0, state.slot_gen + 1)
    gen_keys = jax.vmap(attack_de.generation_key)(keys, generation)

    candidates = jax.vmap(attack_de.propose, (0, 0, 0, None, None))(
        gen_keys, state.search.de_state, fresh, config, image_shape
    )
    pixels = attack_de.decode_candidates(candidates, image_shape)  # (S, P, k, 5)
    images = q_images[at]
    search_fn = apply_fn if search_apply_fn is None else search_apply_fn
    logits, work = _active_forward(
        candidate_forward or functools.partial(_full_forward, search_fn),
        variables,
        images,
        pixels,
        active,
        buckets,
    )
    scores = jax.vmap(attack_de.score)(logits, pixels, labels, targets)
    search = jax.vmap(attack_de.update_search, (0, 0, 0, 0, 0, None))(
        gen_keys, state.search, candidates, scores, fresh, config
    )
    report = None if search_apply_fn is None else (apply_fn, variables)
    found = jax.vmap(attack_de.verdict, (0, 0, 0, 0, 0, None))(
        search, scores, images, labels, targets, report
    )

    finished = active & (found.success | (generation >= config.generations))
    write = jnp.where(finished, slot_pos, queue_len)  # out of range: dropped
    count_at = jnp.where(active, slot_pos, queue_len)
    return SlotState(
        slot_pos=jnp.where(finished, -1, slot_pos),
        slot_gen=generation,
        search=search,
        next_pos=next_pos,
        res_success=state.res_success.at[write].set(found.success, mode="drop"),
        res_pixels=state.res_pixels.at[write].set(found.pixels, mode="drop"),
        res_prob_true=state.res_prob_true.at[write].set(found.prob_true, mode="drop"),
        res_pred=state.res_pred.at[write].set(found.pred, mode="drop"),
        res_generations=state.res_generations.at[write].set(generation, mode="drop"),
        res_rejections=state.res_rejections.at[count_at].add(
            found.rejected.astype(jnp.int32), mode="drop"
        ),
        evaluated=state.evaluated + work,
    )


def run(
    apply_fn: ApplyFn,
    search_apply_fn: ApplyFn | None,
    config: AttackConfig,
    key: jax.Array,
    variables: Any,
    queue: tuple[jax.Array, ...],
    queue_size: jax.Array,
    bound: jax.Array,
    max_steps: jax.Array,
    state: SlotState,
    candidate_forward: CandidateForward | None = None,
    active_buckets: bool = True,
) -> SlotState:
    """Steps until every queue position < bound is finished, or max_steps steps.

    Stopping after max_steps and calling again continues the same sequence of
    steps, so the results do not depend on max_steps. `active_buckets`: the
    forward runs only the active slots, in `buckets_of(slots)` sizes (else always
    all slots; `backend.CHOICES["active_buckets"]` says where it is on).
    """
    slots = state.slot_pos.shape[0]
    buckets = buckets_of(slots) if active_buckets else (slots,)
    global TRACE_COUNT
    TRACE_COUNT += 1

    def unfinished(carry):
        state, steps = carry
        pending = (state.slot_pos >= 0) & (state.slot_pos < bound)
        return ((state.next_pos < bound) | jnp.any(pending)) & (steps < max_steps)

    def body(carry):
        state, steps = carry
        state = step(
            apply_fn,
            search_apply_fn,
            variables,
            config,
            key,
            queue,
            queue_size,
            state,
            candidate_forward,
            buckets,
        )
        return state, steps + 1

    state, _ = jax.lax.while_loop(unfinished, body, (state, jnp.int32(0)))
    return state


@functools.lru_cache(maxsize=32)
def build_programs(
    apply_fn: ApplyFn,
    search_apply_fn: ApplyFn | None,
    config: AttackConfig,
    slots: int,
    queue_len: int,
    mesh: Mesh,
    key_impl: str,
    candidate_forward: CandidateForward | None = None,
    active_buckets: bool = True,
):
    """The jitted (run, init) programs over the mesh, cached on what decides them.

    `run(key_data, variables, queue, queue_size, bound, max_steps, state)`: the
    variables are replicated, the queue and state sharded over the mesh's axis.
    Nothing here holds the weights, so the cache keeps no model alive.
    """
    spec = PartitionSpec(mesh.axis_names[0])
    replicated = PartitionSpec()

    def squeeze(tree):
        return jax.tree_util.tree_map(lambda x: x[0], tree)

    def expand(tree):
        return jax.tree_util.tree_map(lambda x: x[None], tree)

    def run_local(key_data, variables, queue, queue_size, bound, max_steps, state):
        key = jax.random.wrap_key_data(key_data, impl=key_impl)
        out = run(
            apply_fn,
            search_apply_fn,
            config,
            key,
            variables,
            squeeze(queue),
            queue_size[0],
            bound[0],
            max_steps,
            squeeze(state),
            candidate_forward,
            active_buckets,
        )
        return expand(out)

    program = jax.jit(
        jax.shard_map(
            run_local,
            mesh=mesh,
            in_specs=(replicated, replicated, spec, spec, spec, replicated, spec),
            out_specs=spec,
            check_vma=False,
        )
    )
    init_program = jax.jit(
        jax.shard_map(
            lambda next_pos: expand(init_state(config, slots, queue_len, next_pos[0])),
            mesh=mesh,
            in_specs=(spec,),
            out_specs=spec,
            check_vma=False,
        )
    )
    return program, init_program
