"""The one-pixel attack of one image: DE pieces, keys and `attack_image`.

A candidate is a real vector of 5k numbers, k times (row, col, r, g, b). It is
searched by evosax's `DifferentialEvolution` with the settings of Su et al.:
DE/rand/1, F = 0.5, no crossover (crossover rate 1), greedy one-to-one
replacement, no elitism. Trial vectors are projected onto the box of valid
pixels before they are evaluated and stored, so every population member decodes
to the candidate it was scored as. Decoding takes the floor of row/col (clipped
to the image) and rounds the colours into 0..255.

Every random draw of an image comes from its key, `image_key(key, dataset_index)`:
generation g uses `generation_key(image key, g)` (g = 0: the initial population,
g >= 1: DE's mutation), so results never depend on batching. `attack_image` is the
whole attack of one image as a pure function (it jits, vmaps and runs inside a
user's `jit`); the slot engine (`attack_engine`) runs the same steps
(`propose`, `score`, `update_search`, `outcome`) for many images at once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from propmaps_jax.attack.perturb import apply_pixels_batch
from propmaps_jax.errors import PropmapsError
from propmaps_jax.types import ApplyFn, PRNGKey, Variables


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


class ImageResult(struct.PyTreeNode):
    """The attack of one image (arrays; batched under `vmap`)."""

    success: jax.Array  # bool ()
    pixels: jax.Array  # int32 (k, 5): the adversarial / best candidate
    # The same names as `AttackResult` (and attack.csv's columns): after the attack.
    prob_true_after: jax.Array  # float32 (): p(label) of that candidate
    pred_after: jax.Array  # int32 (): predicted class of that candidate
    generations: jax.Array  # int32 (): DE generations run (0: initial population)
    evaluations: jax.Array  # int32 (): population * (generations + 1)
    # int32 (): successes of a search forward that the report forward rejected
    search_rejections: jax.Array


class SearchState(struct.PyTreeNode):
    """One image's DE state and the model's verdict on each population member."""

    de_state: Any  # evosax State
    prob_true: jax.Array  # (P,) p(label) of each population member
    pred: jax.Array  # (P,) prediction of each population member


class Scores(struct.PyTreeNode):
    """The model on one population of candidates."""

    pixels: jax.Array  # int32 (P, k, 5)
    fitness: jax.Array  # float32 (P,), minimised
    success: jax.Array  # bool (P,)
    prob_true: jax.Array  # float32 (P,)
    pred: jax.Array  # int32 (P,)


def make_de(config: AttackConfig) -> tuple[Any, Any]:
    """evosax DE and its params for DE/rand/1, no elitism, F and CR of `config`."""
    # Imported here: importing evosax.algorithms starts a JAX backend, which must
    # not happen before jax.distributed.initialize() in multi-host runs.
    from evosax.algorithms import DifferentialEvolution

    de = DifferentialEvolution(
        config.population, solution=jnp.zeros(config.num_dims, jnp.float32)
    )
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
    # float32 explicitly: the same draws with jax_enable_x64 on.
    unit = jax.random.uniform(key_pos, (*shape, 2), jnp.float32)
    positions = unit * jnp.asarray([height, width], jnp.float32)
    normal = jax.random.normal(key_rgb, (*shape, 3), jnp.float32)
    rgb = jnp.clip(128.0 + 127.0 * normal, 0, 255)
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
    labels = jnp.asarray(labels, jnp.int32)
    targets = jnp.asarray(targets, jnp.int32)
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


def propose(
    gen_key: PRNGKey,
    de_state: Any,
    fresh: jax.Array,
    config: AttackConfig,
    image_shape: Sequence[int],
) -> jax.Array:
    """Candidates (P, 5k) of one image's generation: the initial population when
    `fresh`, else DE's trial vectors projected onto the valid box."""
    de, params = make_de(config)
    lower, upper = candidate_bounds(config, image_shape)
    initial = initial_population(gen_key, config, image_shape)
    trial, _ = de.ask(gen_key, de_state, params)
    return jnp.where(fresh, initial, jnp.clip(trial, lower, upper))


def perturbed_batch(images: jax.Array, pixels: jax.Array) -> jax.Array:
    """Images (B, H, W, 3) each with its candidates (B, P, k, 5): (B * P, H, W, 3)."""
    batch, population, k = pixels.shape[:3]
    shape = images.shape[1:]
    repeated = jnp.broadcast_to(images[:, None], (batch, population, *shape))
    return apply_pixels_batch(
        repeated.reshape(batch * population, *shape), pixels.reshape(-1, k, 5)
    )


def score(
    logits: jax.Array, pixels: jax.Array, label: jax.Array, target: jax.Array
) -> Scores:
    """Scores of one image's candidates from their logits (P, C) and pixels."""
    fit, success, prob_true, pred = fitness(logits, label, target)
    return Scores(pixels, fit, success, prob_true, pred)


def update_search(
    gen_key: PRNGKey,
    state: SearchState,
    candidates: jax.Array,
    scores: Scores,
    fresh: jax.Array,
    config: AttackConfig,
) -> SearchState:
    """Start DE on the scored initial population (`fresh`) or tell it the trials."""
    de, params = make_de(config)
    started = de.init(gen_key, candidates, scores.fitness, params)
    told, _ = de.tell(gen_key, candidates, scores.fitness, state.de_state, params)
    de_state = jax.tree_util.tree_map(
        lambda a, b: jnp.where(fresh, a, b), started, told
    )
    # Mirror evosax's greedy replacement (trial kept when fitness <= parent's).
    keep_new = fresh | (scores.fitness <= state.de_state.fitness)
    return SearchState(
        de_state=de_state,
        prob_true=jnp.where(keep_new, scores.prob_true, state.prob_true),
        pred=jnp.where(keep_new, scores.pred, state.pred),
    )


def outcome(
    state: SearchState, scores: Scores, image_shape: Sequence[int]
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(success, pixels, p(label), prediction) of one image after a generation.

    The adversarial example is the most confident successful candidate; without
    one, the best member of the population.
    """
    success = jnp.any(scores.success)
    success_at = jnp.argmin(jnp.where(scores.success, scores.fitness, jnp.inf))
    best_at = jnp.argmin(state.de_state.fitness)
    best_pixels = decode_candidates(state.de_state.population[best_at], image_shape)
    pixels = jnp.where(success, scores.pixels[success_at], best_pixels)
    prob_true = jnp.where(
        success, scores.prob_true[success_at], state.prob_true[best_at]
    )
    pred = jnp.where(success, scores.pred[success_at], state.pred[best_at])
    return success, pixels, prob_true, pred


def empty_search_state(config: AttackConfig) -> SearchState:
    """A placeholder state (replaced by `update_search` on a fresh image)."""
    de, params = make_de(config)
    zeros = jnp.zeros((config.population, config.num_dims), jnp.float32)
    de_state = de.init(
        jax.random.key(0), zeros, jnp.zeros((config.population,), jnp.float32), params
    )
    return SearchState(
        de_state=de_state,
        prob_true=jnp.zeros((config.population,), jnp.float32),
        pred=jnp.zeros((config.population,), jnp.int32),
    )


class Verdict(struct.PyTreeNode):
    """What is reported for one image after a generation."""

    success: jax.Array  # bool ()
    pixels: jax.Array  # int32 (k, 5)
    prob_true: jax.Array  # float32 ()
    pred: jax.Array  # int32 ()
    rejected: jax.Array  # bool (): the search saw a success the report forward did not


def verdict(
    state: SearchState,
    scores: Scores,
    image: jax.Array,
    label: jax.Array,
    target: jax.Array,
    report: tuple[ApplyFn, Variables] | None,
) -> Verdict:
    """The outcome of a generation, checked by the report forward when the search
    used another one (`report` = (apply_fn, variables), e.g. float32 behind a
    bfloat16 search): the candidate is kept, its success, p(label) and prediction
    are the report forward's."""
    success, pixels, prob_true, pred = outcome(state, scores, image.shape)
    if report is None:
        return Verdict(success, pixels, prob_true, pred, jnp.zeros((), bool))
    apply_fn, variables = report
    logits = apply_fn(variables, perturbed_batch(image[None], pixels[None, None]))
    _, checked, prob_checked, pred_checked = fitness(logits[0], label, target)
    return Verdict(checked, pixels, prob_checked, pred_checked, success & ~checked)


def attack_image(
    key: PRNGKey,
    apply_fn: ApplyFn,
    variables: Variables,
    image: jax.Array,
    label: jax.Array,
    config: AttackConfig,
    target: jax.Array | int = -1,
    search_apply_fn: ApplyFn | None = None,
) -> ImageResult:
    """The one-pixel attack of one image (H, W, 3), uint8 or float in 0..255.

    Pure: jit it, vmap it over images, call it inside your own `jit` with traced
    variables. `key` is the image's key (`image_key(key, dataset_index)` gives the
    results of the slot engine, `attack.attack`). Generations run in a
    `lax.while_loop` that stops at the first generation with a successful
    candidate. `target` < 0: untargeted (success: prediction != label); else
    success when the prediction is `target`.

    `search_apply_fn` (e.g. the same module with dtype=bfloat16): the forward the
    search uses; every reported number then comes from `apply_fn`, and a success
    of the search that `apply_fn` rejects is counted in `search_rejections` while
    the search goes on.
    """
    image_shape = tuple(image.shape)
    label = jnp.asarray(label, jnp.int32)
    target = jnp.asarray(target, jnp.int32)
    search_fn = apply_fn if search_apply_fn is None else search_apply_fn
    report = None if search_apply_fn is None else (apply_fn, variables)

    def generation(state: SearchState, gen: jax.Array, fresh: bool):
        gen_key = generation_key(key, gen)
        candidates = propose(gen_key, state.de_state, fresh, config, image_shape)
        pixels = decode_candidates(candidates, image_shape)
        logits = search_fn(variables, perturbed_batch(image[None], pixels[None]))
        scores = score(logits, pixels, label, target)
        state = update_search(gen_key, state, candidates, scores, fresh, config)
        return state, verdict(state, scores, image, label, target, report)

    def unfinished(carry):
        gen, _, found, _ = carry
        return ~found.success & (gen < config.generations)

    def body(carry):
        gen, state, _, rejections = carry
        state, found = generation(state, gen + 1, False)
        return gen + 1, state, found, rejections + found.rejected

    start, found = generation(empty_search_state(config), jnp.int32(0), True)
    gen, _, found, rejections = jax.lax.while_loop(
        unfinished, body, (jnp.int32(0), start, found, found.rejected.astype(jnp.int32))
    )
    return ImageResult(
        success=found.success,
        pixels=found.pixels,
        prob_true_after=found.prob_true,
        pred_after=found.pred,
        generations=gen,
        evaluations=jnp.int32(config.population) * (gen + 1),
        search_rejections=rejections,
    )
