"""Device memory of the attack, counted before it runs.

An accelerator's attack evaluates slots x population candidates (32,768 by default)
in one forward, so its memory is mostly that forward's activations. They are
counted here from the forward's jaxpr, without compiling or running it: walking the
equations in program order, a value is live from the equation that makes it to its
last use, and the count is the largest total of live values (an equation's own
inputs and outputs included; the inner programs of calls and control flow
counted at their own peak). The part that grows with the batch, per candidate, is
the difference between two batch sizes.

What this is: the activations a straightforward schedule keeps alive, for the
model as written. What it is not: XLA's buffer assignment on a given device. XLA
fuses elementwise chains (fewer buffers: the count is then high), may schedule
differently, may add scratch space (cuDNN workspaces), and on a TPU pads the
minor dimensions of arrays to tiles of 8 x 128 (an activation with 16 channels
may take up to 8x its size if the layout puts channels last). `default_slots`
therefore leaves a wide margin (`MEMORY_FRACTION`); BENCHMARKS.md compares this
count with XLA's CPU memory analysis of the compiled engine.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np

from propmaps_jax.types import ApplyFn, Variables

__all__ = [
    "MEMORY_FRACTION",
    "AttackMemory",
    "attack_memory",
    "forward_bytes_per_candidate",
    "peak_live_bytes",
    "search_bytes_per_slot",
    "slots_that_fit",
    "tree_bytes",
]

# Share of the device's memory (`bytes_limit`) that the default slot count may fill
# by the count below: the rest is margin for what the count does not see (TPU tile
# padding, scratch space, XLA's schedule).
MEMORY_FRACTION = 0.5


def _bytes(var: Any) -> int:
    aval = getattr(var, "aval", None)
    shape = getattr(aval, "shape", None)
    if shape is None:
        return 0
    try:
        itemsize = np.dtype(aval.dtype).itemsize
    except TypeError:  # PRNG key arrays and other extended dtypes
        itemsize = 8
    return int(np.prod(shape, dtype=np.int64)) * itemsize


def _subjaxprs(eqn: Any) -> Iterator[Any]:
    for value in eqn.params.values():
        for item in value if isinstance(value, tuple | list) else (value,):
            if isinstance(item, jax.extend.core.ClosedJaxpr):
                yield item.jaxpr
            elif isinstance(item, jax.extend.core.Jaxpr):
                yield item


def peak_live_bytes(jaxpr: Any, skip: Sequence[Any] = ()) -> int:
    """Largest total bytes of values live at once in `jaxpr` (program order).

    `skip`: input variables not counted (e.g. the weights, counted apart).
    """
    eqns = jaxpr.eqns
    last: dict[Any, int] = {}
    for i, eqn in enumerate(eqns):
        for v in eqn.invars:
            if isinstance(v, jax.extend.core.Var):
                last[v] = i
    for v in jaxpr.outvars:
        if isinstance(v, jax.extend.core.Var):
            last[v] = len(eqns)
    skipped = set(skip)
    live = {v: _bytes(v) for v in jaxpr.invars if v in last and v not in skipped}
    current = sum(live.values())
    peak = current
    for i, eqn in enumerate(eqns):
        outs = [v for v in eqn.outvars if not isinstance(v, jax.extend.core.DropVar)]
        out_bytes = sum(_bytes(v) for v in outs)
        ins = {v for v in eqn.invars if not _literal(v)}
        in_bytes = sum(live.get(v, 0) for v in ins)
        inner = max((peak_live_bytes(sub) for sub in _subjaxprs(eqn)), default=0)
        peak = max(peak, current + out_bytes + max(0, inner - in_bytes - out_bytes))
        for v in outs:
            if v in last:
                live[v] = _bytes(v)
        for v in ins:
            if last.get(v) == i:
                live.pop(v, None)
        current = sum(live.values())
    return peak


def _literal(v: Any) -> bool:
    return isinstance(v, jax.extend.core.Literal)


def _forward_peak(
    apply_fn: ApplyFn, variables: Variables, batch: int, image_shape: Sequence[int]
) -> int:
    images = jax.ShapeDtypeStruct((batch, *image_shape), jnp.float32)
    closed = jax.make_jaxpr(apply_fn)(variables, images)
    weights = closed.jaxpr.invars[: len(jax.tree_util.tree_leaves(variables))]
    return peak_live_bytes(closed.jaxpr, skip=weights)


def forward_bytes_per_candidate(
    apply_fn: ApplyFn,
    variables: Variables,
    image_shape: Sequence[int] = (32, 32, 3),
) -> int:
    """Activation bytes per image of `apply_fn`'s forward (float32 input included),
    by `peak_live_bytes` of its jaxpr (traced, never run)."""
    small, large = 1, 9
    peaks = [_forward_peak(apply_fn, variables, b, image_shape) for b in (small, large)]
    return max(1, -(-(peaks[1] - peaks[0]) // (large - small)))


@functools.cache
def search_bytes_per_slot(
    population: int, pixels: int = 1, image_shape: tuple[int, ...] = (32, 32, 3)
) -> int:
    """Peak bytes of one slot's DE step (the trial vectors proposed, then told),
    by `peak_live_bytes` of its jaxpr (traced, never run).

    Not linear in the population: evosax's DE/rand/1 draws each member's partners
    with `jax.random.choice(..., p=...)` over the whole population, vmapped over
    the members, so the step holds population x population arrays (about 12 bytes
    each at the time of writing: 270 GB per slot at a population of 150,000).
    """
    from propmaps_jax.attack import de  # the attack imports this module

    config = de.AttackConfig(pixels=pixels, population=population)
    state = jax.eval_shape(lambda: de.empty_search_state(config))

    def step(key, state):
        fresh = jnp.bool_(False)
        candidates = de.propose(key, state.de_state, fresh, config, image_shape)
        fit = jnp.sum(candidates, axis=1)  # stands for the model's fitness
        scores = de.Scores(
            de.decode_candidates(candidates, image_shape),
            fit,
            fit > 0,
            fit,
            jnp.zeros(population, jnp.int32),
        )
        return de.update_search(key, state, candidates, scores, fresh, config)

    return peak_live_bytes(jax.make_jaxpr(step)(jax.random.key(0), state).jaxpr)


@dataclasses.dataclass(frozen=True)
class AttackMemory:
    """Bytes of one device's attack program, by part (an estimate, see module doc)."""

    weights: int  # the model's variables
    queue: int  # the device's queue of images, labels, keys and results
    per_candidate: int  # forward activations per candidate
    per_candidate_state: int  # DE state per candidate (population and trials)
    candidates: int  # slots x population
    per_slot_search: int = 0  # one slot's DE step (population^2: `search_bytes...`)
    slots: int = 0

    @property
    def total(self) -> int:
        return (
            self.weights
            + self.queue
            + self.candidates * (self.per_candidate + self.per_candidate_state)
            + self.slots * self.per_slot_search
        )


def tree_bytes(tree: Any) -> int:
    """Bytes of the arrays (or shape structs) of a pytree."""
    return sum(
        int(np.prod(np.shape(x), dtype=np.int64)) * np.dtype(x.dtype).itemsize
        for x in jax.tree_util.tree_leaves(tree)
    )


def attack_memory(
    apply_fn: ApplyFn,
    variables: Variables,
    slots: int,
    population: int,
    queue_len: int,
    image_shape: Sequence[int] = (32, 32, 3),
    pixels: int = 1,
) -> AttackMemory:
    """The estimated memory of one device's attack: `slots` slots of `population`
    candidates, a queue of `queue_len` images, `apply_fn`'s forward.

    The DE state is counted as three float32 rows (population, trials, their
    decoded pixels) of pixels x 5 values per candidate, and each slot's DE step
    at its own peak (`search_bytes_per_slot`, which grows with the square of
    the population), the queue as the uint8
    image, its label, target, index and the results (pixels x 5 + 5 values).
    """
    return AttackMemory(
        weights=tree_bytes(variables),
        queue=queue_len * (int(np.prod(image_shape)) + 4 * (3 + 5 * pixels + 5)),
        per_candidate=forward_bytes_per_candidate(apply_fn, variables, image_shape),
        per_candidate_state=3 * 4 * 5 * pixels,
        candidates=slots * population,
        per_slot_search=search_bytes_per_slot(
            population, pixels, tuple(int(d) for d in image_shape)
        ),
        slots=slots,
    )


def slots_that_fit(
    memory_bytes: int,
    estimate: AttackMemory,
    population: int,
    fraction: float = MEMORY_FRACTION,
) -> int:
    """The most slots of `population` candidates whose estimate (any slot count's:
    only its per-candidate and fixed parts are used) fits in `fraction` of
    `memory_bytes`; at least 1."""
    usable = fraction * memory_bytes - estimate.weights - estimate.queue
    per_slot = (
        estimate.per_candidate + estimate.per_candidate_state
    ) * population + estimate.per_slot_search
    return max(1, int(usable // per_slot))
