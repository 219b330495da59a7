"""The one-pixel attack engine against hand-computed cases and a per-image reference."""

import functools
import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from propmaps_jax import attack, models
from propmaps_jax.attack import engine as attack_engine
from propmaps_jax.errors import PropmapsError
from tests._attack_case import CONFIG, SLOTS, attack_args, attack_case, lenet_case


@pytest.fixture(scope="module")
def case():
    return lenet_case()


@pytest.fixture(scope="module")
def engine_result(case):
    """The fixed case with SLOTS slots and three chunks, and the traces it cost."""
    before = attack_engine.TRACE_COUNT
    result = attack_case(slots=SLOTS, chunk_ends=[2, 5, 8], case=case)
    return result, attack_engine.TRACE_COUNT - before


def decode_np(vectors: np.ndarray, height: int, width: int) -> np.ndarray:
    """Independent NumPy decoding: floor + clip of row/col, round + clip of RGB."""
    p = np.asarray(vectors, np.float64).reshape(*np.shape(vectors)[:-1], -1, 5)
    rows = np.clip(np.floor(p[..., 0]), 0, height - 1)
    cols = np.clip(np.floor(p[..., 1]), 0, width - 1)
    rgb = np.clip(np.round(p[..., 2:]), 0, 255)
    return np.concatenate([rows[..., None], cols[..., None], rgb], -1).astype(int)


def apply_np(image: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    out = image.copy()
    for row, col, r, g, b in pixels:
        out[row, col] = (r, g, b)
    return out


@functools.lru_cache(maxsize=4)
def jitted(logits_fn):
    return jax.jit(logits_fn)


def probs_np(logits_fn, images: np.ndarray) -> np.ndarray:
    """Softmax in float64 of the model's logits."""
    logits = np.asarray(jitted(logits_fn)(images), np.float64)
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def reference_attack(logits_fn, image, label, index, key, config, target=-1):
    """Plain per-image loop: evosax ask/tell, NumPy decoding, pixels and fitness."""
    de, params = attack.make_de(config)
    height, width = image.shape[:2]
    upper = np.tile([height, width, 255.0, 255.0, 255.0], config.pixels)
    key = jax.random.fold_in(key, index)

    def evaluate(candidates):
        pixels = decode_np(candidates, height, width)
        probs = probs_np(logits_fn, np.stack([apply_np(image, p) for p in pixels]))
        pred = probs.argmax(-1)
        if target < 0:
            return probs[:, label], pred != label, probs[:, label], pred, pixels
        return 1 - probs[:, target], pred == target, probs[:, label], pred, pixels

    population = np.asarray(
        attack.initial_population(jax.random.fold_in(key, 0), config, image.shape)
    )
    fit, success, prob_true, pred, pixels = evaluate(population)
    state = de.init(key, jnp.asarray(population), jnp.asarray(fit, jnp.float32), params)
    generation = 0
    while not success.any() and generation < config.generations:
        generation += 1
        gen_key = jax.random.fold_in(key, generation)
        trial, _ = de.ask(gen_key, state, params)
        trial = np.clip(np.asarray(trial), 0, upper).astype(np.float32)
        fit, success, prob_true, pred, pixels = evaluate(trial)
        state, _ = de.tell(
            gen_key, jnp.asarray(trial), jnp.asarray(fit, jnp.float32), state, params
        )
    if success.any():
        best = int(np.argmin(np.where(success, fit, np.inf)))
        return True, pixels[best], prob_true[best], pred[best], generation
    best = int(np.argmin(np.asarray(state.fitness)))
    _, _, prob_true, pred, pixels = evaluate(
        np.asarray(state.population)[best : best + 1]
    )
    return False, pixels[0], prob_true[0], pred[0], generation


def test_config_validation():
    assert attack.AttackConfig() == attack.AttackConfig(1, 400, 100, 0.5, 1.0)
    with pytest.raises(PropmapsError, match="population must be an integer >= 4"):
        attack.AttackConfig(population=3)
    with pytest.raises(PropmapsError, match="pixels must be an integer >= 1"):
        attack.AttackConfig(pixels=0)
    with pytest.raises(PropmapsError, match="generations must be an integer >= 1"):
        attack.AttackConfig(generations=0)
    with pytest.raises(PropmapsError, match="crossover_rate"):
        attack.AttackConfig(crossover_rate=1.5)


def test_decode_candidates_hand_computed():
    vectors = jnp.asarray(
        [[31.9, -3.0, 255.6, -2.0, 127.4, 40.0, 5.2, 10.5, 11.5, 300.0]], jnp.float32
    )
    expected = [[[31, 0, 255, 0, 127], [31, 5, 10, 12, 255]]]
    np.testing.assert_array_equal(
        attack.decode_candidates(vectors, (32, 32, 3)), expected
    )
    # A non-square image clips rows and cols separately.
    np.testing.assert_array_equal(
        attack.decode_candidates(jnp.asarray([7.5, 7.5, 0, 0, 0]), (8, 6, 3)),
        [[7, 5, 0, 0, 0]],
    )


def test_initial_population(key):
    config = attack.AttackConfig(pixels=2, population=4000)
    population = np.asarray(attack.initial_population(key, config, (8, 6, 3)))
    assert population.shape == (4000, 10)
    pixels = population.reshape(4000, 2, 5)
    assert pixels[..., 0].min() >= 0 and pixels[..., 0].max() < 8
    assert pixels[..., 1].min() >= 0 and pixels[..., 1].max() < 6
    decoded = np.asarray(attack.decode_candidates(population, (8, 6, 3)))
    # Uniform positions: every row and column is drawn.
    assert set(decoded[..., 0].ravel()) == set(range(8))
    assert set(decoded[..., 1].ravel()) == set(range(6))
    rgb = pixels[..., 2:].ravel()
    assert rgb.min() == 0 and rgb.max() == 255
    # N(128, 127) clipped to [0, 255]: P(x <= 0) = Phi(-128/127) ~ 0.157.
    assert abs(np.mean(rgb == 0) - 0.157) < 0.015
    assert abs(np.median(rgb) - 128) < 5


def test_de_settings_are_rand_1_without_crossover(key):
    config = attack.AttackConfig(population=8)
    de, params = attack.make_de(config)
    assert not params.elitism
    assert params.crossover_rate == 1.0
    assert params.differential_weight == 0.5
    assert params.differential_weight_min == params.differential_weight_max == 0.5
    population = np.asarray(jax.random.uniform(key, (8, 5)) * 100, np.float32)
    fitness = np.arange(8, dtype=np.float32)
    state = de.init(key, jnp.asarray(population), jnp.asarray(fitness), params)
    trial, _ = de.ask(jax.random.key(3), state, params)
    trial = np.asarray(trial)
    bases = []
    for i in range(8):
        # Every coordinate from a + F (b - c) with a, b, c distinct and not i.
        matches = [
            (a, b, c)
            for a, b, c in itertools.permutations(set(range(8)) - {i}, 3)
            if np.allclose(
                trial[i],
                population[a] + 0.5 * (population[b] - population[c]),
                atol=1e-4,
            )
        ]
        assert matches, f"member {i} is not a DE/rand/1 mutant"
        bases.append(matches[0][0])
    # No elitism: the base vector is not always the best member (index 0).
    assert len(set(bases)) > 1


def test_fitness_hand_computed():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]]))
    fit, success, prob_true, pred = attack.fitness(
        logits, jnp.asarray([0, 0]), jnp.asarray([-1, 2])
    )
    np.testing.assert_allclose(fit, [0.5, 0.7], rtol=1e-6)
    np.testing.assert_array_equal(success, [False, False])
    np.testing.assert_allclose(prob_true, [0.5, 0.1], rtol=1e-6)
    np.testing.assert_array_equal(pred, [0, 1])


def test_engine_matches_per_image_reference(case, engine_result):
    apply_fn, variables, images, labels, indices = case
    logits_fn = models.make_logits_fn(apply_fn.module, variables)
    result, traces = engine_result
    assert traces == 1  # three chunks, one program
    outcomes = set()
    for i in range(len(images)):
        success, pixels, prob_true, pred, generations = reference_attack(
            logits_fn, images[i], labels[i], indices[i], jax.random.key(7), CONFIG
        )
        assert result.success[i] == success, i
        np.testing.assert_array_equal(result.pixels[i], pixels)
        assert result.pred_after[i] == pred
        np.testing.assert_allclose(result.prob_true_after[i], prob_true, rtol=1e-5)
        assert result.generations[i] == generations
        assert result.evaluations[i] == CONFIG.population * (generations + 1)
        outcomes.add((success, generations in (0, CONFIG.generations)))
    # The case covers early successes, later successes and failures.
    assert {(True, True), (True, False), (False, True)} <= outcomes


def test_results_independent_of_slots_and_chunks(case, engine_result):
    reference, _ = engine_result
    # 3 slots: refills happen at different steps than with 4; 4 forced devices and
    # 2 processes are in test_attack_distributed.py.
    result = attack_case(slots=3, chunk_ends=[1, 2, 3, 8], case=case)
    for field, expected in zip(result, reference, strict=True):
        np.testing.assert_array_equal(field, expected)


def test_progress_calls_in_bounded_steps_give_the_same_results(case, engine_result):
    # progress_every_s=0: one DE step per device call, the progress callback
    # between every two calls; stopping and continuing the loop changes nothing.
    reference, _ = engine_result
    labels = case[3]
    reports = []
    result = attack_case(
        slots=SLOTS,
        chunk_ends=[4, 8],
        case=case,
        on_progress=lambda info: reports.append(info),
        progress_every_s=0.0,
    )
    for field, expected in zip(result, reference, strict=True):
        np.testing.assert_array_equal(field, expected)
    assert reports, "on_progress was never called"
    finished = [r.finished for r in reports]
    assert finished == sorted(finished) and finished[-1] <= len(labels)
    assert all(0 <= r.successes <= r.finished for r in reports)
    assert max(r.successes for r in reports) <= int(reference.success.sum())
    for r in reports:
        assert r.total == len(labels) and r.max_generations == CONFIG.generations
        assert r.finished + len(r.running_generations) + r.remaining <= r.total
        assert np.all(r.running_generations <= CONFIG.generations)
        assert r.evaluations >= CONFIG.population * (
            r.finished + len(r.running_generations)
        )
    evaluations = [r.evaluations for r in reports]
    assert evaluations == sorted(evaluations)
    assert evaluations[-1] <= int(reference.evaluations.sum())


def test_resume_start_gives_the_same_results(case, engine_result):
    reference, _ = engine_result
    before = attack_engine.TRACE_COUNT
    parts = list(
        attack.attack_stream(
            *attack_args(case), slots=SLOTS, chunk_ends=[6, 8], start=5
        )
    )
    assert attack_engine.TRACE_COUNT == before  # same program as the run from 0
    result = attack.concatenate_results(parts)
    for field, expected in zip(result, reference, strict=True):
        np.testing.assert_array_equal(field, expected[5:])


def toy_apply(variables, images):
    """3 classes from pixel statistics: class 1 needs a pixel with red > 100 in an
    image whose mean blue is >= 100, class 2 a pixel with green > 150 (green wins)."""
    images = images.astype(jnp.float32)
    gate = (images[..., 2].mean((1, 2)) >= 100).astype(jnp.float32)
    red = images[..., 0].max((1, 2))
    green = images[..., 1].max((1, 2))
    return jnp.stack(
        [jnp.ones_like(red), gate * red / 100, 2.0 * (green > 150) * gate], -1
    )


def test_early_stop_failure_targeted_and_three_pixels(key):
    config = attack.AttackConfig(pixels=3, population=8, generations=3)
    images = np.zeros((3, 8, 8, 3), np.uint8)
    images[0, ..., 2] = 200  # can be flipped to class 1 (or 2)
    images[2, ..., 2] = 200  # targeted at class 2
    labels = np.zeros(3, int)
    targets = np.asarray([-1, -1, 2])
    result = attack.attack(
        toy_apply,
        None,
        images,
        labels,
        np.arange(3),
        key,
        config,
        targets=targets,
        slots=2,
    )
    population = np.asarray(
        attack.initial_population(
            jax.random.fold_in(jax.random.fold_in(key, 0), 0), config, (8, 8, 3)
        )
    )
    # Image 0: some initial candidate has red > 100 -> success at generation 0.
    assert result.success[0] and result.generations[0] == 0
    assert result.evaluations[0] == config.population
    assert result.pixels.shape == (3, 3, 5)
    decoded = decode_np(population, 8, 8)
    assert (decoded[..., 2].max(1) > 100).any()
    # Image 1 (gate closed) can never change class: all generations, best candidate.
    assert not result.success[1] and result.generations[1] == config.generations
    assert result.evaluations[1] == config.population * (config.generations + 1)
    np.testing.assert_allclose(
        result.prob_true_after[1], np.exp(1) / (np.exp(1) + 2), rtol=1e-6
    )
    # Image 2 targeted at class 2: success means prediction 2, not just != 0.
    assert result.success[2] and result.pred_after[2] == 2
    # Every reported candidate reproduces its reported prediction and p(true).
    toy_logits = lambda x: toy_apply(None, x)  # noqa: E731 (one program for the loop)
    for i in range(3):
        adversarial = apply_np(images[i], result.pixels[i])
        probs = probs_np(toy_logits, adversarial[None])[0]
        assert probs.argmax() == result.pred_after[i]
        np.testing.assert_allclose(probs[0], result.prob_true_after[i], rtol=1e-5)


def test_bad_inputs(case):
    apply_fn, variables, images, labels, indices = case
    key = jax.random.key(0)
    run = lambda *a, **kw: attack.attack(  # noqa: E731
        apply_fn, variables, *a, key, CONFIG, **kw
    )
    with pytest.raises(PropmapsError, match="uint8"):
        run(images.astype(np.float32), labels, indices)
    with pytest.raises(PropmapsError, match=r"\(N, H, W, 3\)"):
        run(images[..., 0], labels, indices)
    with pytest.raises(PropmapsError, match="target class equals the true label"):
        run(images, labels, indices, targets=labels)
    with pytest.raises(PropmapsError, match="labels must have shape"):
        run(images, labels[:3], indices)
    with pytest.raises(PropmapsError, match="indices must be distinct"):
        run(images, labels, np.zeros_like(indices))


def test_attack_image_under_jit_and_vmap_matches_the_engine(case, engine_result):
    """The pure per-image attack, vmapped inside a user's jit with traced variables,
    takes the engine's decisions and pixels with the same keys."""
    apply_fn, variables, images, labels, indices = case
    reference, _ = engine_result

    @jax.jit
    @chex.assert_max_traces(n=1)
    def attack_all(key, variables, images, labels, indices):
        keys = jax.vmap(attack.image_key, (None, 0))(key, indices)
        one = functools.partial(attack.attack_image, apply_fn=apply_fn, config=CONFIG)
        return jax.vmap(lambda k, x, y: one(k, variables=variables, image=x, label=y))(
            keys, images, labels
        )

    out = attack_all(jax.random.key(7), variables, images, labels, indices)
    np.testing.assert_array_equal(out.success, reference.success)
    np.testing.assert_array_equal(out.pixels, reference.pixels)
    np.testing.assert_array_equal(out.pred_after, reference.pred_after)
    np.testing.assert_array_equal(out.generations, reference.generations)
    np.testing.assert_array_equal(out.evaluations, reference.evaluations)
    np.testing.assert_allclose(
        out.prob_true_after, reference.prob_true_after, rtol=1e-5
    )
    # New weights of the same shapes: no new trace (chex counts them).
    halved = jax.tree_util.tree_map(lambda x: x / 2, variables)
    attack_all(jax.random.key(7), halved, images, labels, indices)


def test_new_weights_never_recompile_the_engine(case):
    """The engine's program is cached on (apply_fn, config, shapes, mesh): an equal
    module with new variables reuses it; the results follow the new weights. (The
    program is the fixed case's, which engine_result counts traced once.)"""
    apply_fn, variables, images, labels, indices = case
    first = attack.attack(
        apply_fn,
        variables,
        images,
        labels,
        indices,
        jax.random.key(1),
        CONFIG,
        slots=SLOTS,
    )
    traced = attack_engine.TRACE_COUNT
    module = models.create_model("lenet_tiny")  # a new, equal module
    other = models.init_variables(module, jax.random.key(5))
    other_labels = np.asarray(jnp.argmax(apply_fn(other, images), -1))
    second = attack.attack(
        models.make_apply_fn(module),
        other,
        images,
        other_labels,
        indices,
        jax.random.key(1),
        CONFIG,
        slots=SLOTS,
    )
    assert attack_engine.TRACE_COUNT == traced
    # The new weights were used: p(label) of the reported pixels, recomputed.
    logits_fn = models.make_logits_fn(module, other)
    for i in range(len(images)):
        perturbed = apply_np(images[i], second.pixels[i])[None]
        probs = probs_np(logits_fn, perturbed)[0]
        np.testing.assert_allclose(
            probs[other_labels[i]], second.prob_true_after[i], rtol=1e-5
        )
    assert not np.array_equal(first.prob_true_after, second.prob_true_after)


def test_attack_works_with_x64_enabled(case):
    """With jax_enable_x64 on, the engine and attack_image run (no int64/float64 loop
    carries) and report consistent float32/int32 results."""
    apply_fn, variables, images, labels, indices = case
    config = attack.AttackConfig(population=8, generations=2)
    with jax.enable_x64(True):
        result = attack.attack(
            apply_fn,
            variables,
            images[:3],
            labels[:3],
            indices[:3],
            jax.random.key(1),
            config,
        )
        one = jax.jit(
            lambda k, v, x, y: attack.attack_image(k, apply_fn, v, x, y, config)
        )(jax.random.key(1), variables, images[0], labels[0])
    assert one.pixels.dtype == jnp.int32 and one.prob_true_after.dtype == jnp.float32
    assert result.pixels.shape == (3, 1, 5)
    logits_fn = models.make_logits_fn(apply_fn.module, variables)
    for i in range(3):
        perturbed = apply_np(images[i], result.pixels[i])[None]
        probs = probs_np(logits_fn, perturbed)[0]
        np.testing.assert_allclose(
            probs[labels[i]], result.prob_true_after[i], rtol=1e-5
        )
        assert (probs.argmax() != labels[i]) == result.success[i]


def test_search_forward_successes_are_checked_and_counted(case):
    """A search forward that always sees a success (negated logits): the report
    forward rejects it, the rejection is counted and the search goes on; the engine
    and attack_image agree, and every reported number is the report forward's."""
    apply_fn, variables, images, labels, indices = case
    config = attack.AttackConfig(population=8, generations=2)

    def lying(v, x):
        return -apply_fn(v, x)

    result = attack.attack(*case, jax.random.key(3), config, search_apply_fn=lying)
    keys = jax.vmap(attack.image_key, (None, 0))(jax.random.key(3), indices)
    one = jax.jit(
        jax.vmap(
            lambda k, x, y: attack.attack_image(
                k, apply_fn, variables, x, y, config, search_apply_fn=lying
            )
        )
    )(keys, images, labels)
    np.testing.assert_array_equal(one.success, result.success)
    np.testing.assert_array_equal(one.pixels, result.pixels)
    np.testing.assert_array_equal(one.search_rejections, result.search_rejections)
    logits_fn = models.make_logits_fn(apply_fn.module, variables)
    for i in range(len(images)):
        probs = probs_np(logits_fn, apply_np(images[i], result.pixels[i])[None])[0]
        assert (probs.argmax() != labels[i]) == result.success[i]
        np.testing.assert_allclose(probs[labels[i]], result.prob_true_after[i], 1e-5)
        if not result.success[i]:  # rejected at every generation, searched to the end
            assert result.generations[i] == config.generations
            assert result.search_rejections[i] == config.generations + 1
    assert result.search_rejections.sum() > 0


def test_default_slots_depend_on_the_backend():
    # A CPU's forward is fastest at about one population of 400 (BENCHMARKS.md);
    # an accelerator wants about 32768 candidates per step.
    assert attack.default_slots(400, 100, 1, "cpu") == 1
    assert attack.default_slots(100, 100, 1, "cpu") == 5
    assert attack.default_slots(100, 3, 1, "cpu") == 3
    assert attack.default_slots(400, 1000, 1, "gpu") == 82
    assert attack.default_slots(400, 1000, 4, "tpu") == 82
    assert attack.default_slots(400, 10, 4, "gpu") == 3
    assert attack.default_slots(400, 100, 1) == attack.default_slots(
        400, 100, 1, jax.default_backend()
    )


@pytest.mark.parametrize("slots", [1, 5, 8])
def test_forward_of_active_slots_uses_the_smallest_bucket(slots):
    buckets = attack_engine.buckets_of(slots)
    assert buckets[0] == slots and buckets[-1] == 1
    assert all(a > b for a, b in zip(buckets, buckets[1:], strict=False))
    population, classes = 3, 2

    def forward(variables, images, pixels):  # logits depend on image and candidate
        base = images.sum((1, 2, 3))[:, None] * variables + pixels[..., 0, 0]
        return jnp.stack([base, -base], -1).reshape(-1, classes)

    images = jnp.arange(slots * 4 * 3, dtype=jnp.float32).reshape(slots, 2, 2, 3)
    pixels = jnp.arange(slots * population, dtype=jnp.int32).reshape(
        slots, population, 1, 1
    )
    pixels = jnp.broadcast_to(pixels, (slots, population, 1, 5))
    full = forward(2.0, images, pixels).reshape(slots, population, classes)
    run = jax.jit(
        lambda active: attack_engine._active_forward(
            forward, 2.0, images, pixels, active, buckets
        )
    )
    rng = np.random.default_rng(slots)
    for count in range(slots + 1):
        active = np.zeros(slots, bool)
        active[rng.choice(slots, count, replace=False)] = True
        logits, work = run(jnp.asarray(active))
        np.testing.assert_array_equal(np.asarray(logits)[active], full[active])
        assert not np.any(np.asarray(logits)[~active])
        assert int(work) == min(b for b in buckets if b >= max(count, 1))


def test_receptive_forward_is_the_cpu_default_for_lenet_and_resnet(case):
    from propmaps_jax.models import receptive

    apply_fn = case[0]
    chosen = attack.default_candidate_forward(apply_fn, None, CONFIG, "cpu")
    assert isinstance(chosen, receptive.CandidateForward)
    resnet = models.make_apply_fn(models.create_model("resnet_tiny"))
    assert attack.default_candidate_forward(resnet, None, CONFIG, "cpu") is not None
    # Not measured faster there, a separate search forward, k > 1, unknown models.
    assert attack.default_candidate_forward(apply_fn, None, CONFIG, "gpu") is None
    assert attack.default_candidate_forward(apply_fn, apply_fn, CONFIG, "cpu") is None
    three = attack.AttackConfig(pixels=3, population=8, generations=2)
    assert attack.default_candidate_forward(apply_fn, None, three, "cpu") is None
    assert attack.default_candidate_forward(toy_apply, None, CONFIG, "cpu") is None


def test_plain_and_receptive_forward_give_the_same_attack(case, engine_result):
    reference, _ = engine_result  # the default: receptive on this CPU
    plain = attack.attack(
        *case, jax.random.key(7), CONFIG, slots=SLOTS, candidate_forward=None
    )
    for name in ("success", "pixels", "pred_after", "generations"):
        np.testing.assert_array_equal(getattr(plain, name), getattr(reference, name))
    np.testing.assert_allclose(
        plain.prob_true_after, reference.prob_true_after, atol=1e-5
    )
    with pytest.raises(PropmapsError, match="candidate_forward"):
        attack.attack(*case, jax.random.key(7), CONFIG, candidate_forward="fast")
