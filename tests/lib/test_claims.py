"""The claim statistics and the figure selection rules against hand-computed and
float64 NumPy references on tiny inputs; post-activation and signed summaries."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from propmaps_jax import models, stats
from propmaps_jax.analysis import claims, propagation
from propmaps_jax.attack import de as attack_de
from propmaps_jax.errors import PropmapsError
from propmaps_jax.results import attack_csv as results


def test_reach_shares_by_hand():
    ratio = np.array([[0.2, 0.95], [0.6, 0.5], [0.9, np.nan], [0.1, 0.3]])
    shares = claims.reach_shares(ratio, (0.5, 0.9))
    assert [s["successes"] for s in shares["0.5"]] == [2, 2]
    assert [s["successes"] for s in shares["0.9"]] == [1, 1]
    assert all(s["n"] == 4 for s in shares["0.5"])  # NaN counts as not reaching
    assert shares["0.5"][0]["rate"] == 0.5
    assert claims.close_to_max_verdict(shares["0.9"]) == "rarely"
    many = claims.reach_shares(np.full((40, 1), 0.95), (0.9,))["0.9"]
    assert claims.close_to_max_verdict(many) == "holds"


def test_bootstrap_mean_against_numpy_resamples():
    values = np.array([1.0, 2.0, 4.0, 7.0, np.nan])
    out = claims.bootstrap_mean(values, seed=3, resamples=500)
    assert out["n"] == 4 and out["mean"] == pytest.approx(3.5)
    finite = values[:4]
    idx = np.random.default_rng(3).integers(0, 4, (500, 4))
    low, high = np.percentile(finite[idx].mean(axis=1), [2.5, 97.5])
    assert (out["ci_low"], out["ci_high"]) == pytest.approx((low, high))
    assert out["ci_low"] <= out["mean"] <= out["ci_high"]
    assert claims.bootstrap_mean(np.array([np.nan]))["n"] == 0


def test_layer_profile_ratios_by_hand():
    values = np.array([[1.0, 4.0, 2.0], [3.0, 8.0, 6.0], [np.nan, 1.0, 1.0]])
    profile = claims.layer_profile(values, resamples=200)
    # The row with a NaN is dropped; the means are (2, 6, 4).
    assert profile["n"] == 2 and profile["dropped"] == 1
    assert [p["mean"] for p in profile["per_layer"]] == pytest.approx([2, 6, 4])
    assert profile["largest_over_smallest"]["ratio"] == pytest.approx(3.0)
    assert profile["last_over_first"]["ratio"] == pytest.approx(2.0)
    r = profile["largest_over_smallest"]
    assert r["ci_low"] <= r["ratio"] <= r["ci_high"]
    assert claims.same_across_layers_verdict(profile) == "fails"
    flat = claims.layer_profile(np.ones((10, 4)) + 0.01 * np.arange(40).reshape(10, 4))
    assert claims.same_across_layers_verdict(flat) == "holds"
    signed = claims.layer_profile(np.array([[-1.0, 2.0], [0.5, 3.0]]), resamples=50)
    assert claims.same_across_layers_verdict(signed).startswith("undecided")


def test_central_square_and_centre_comparison():
    square = claims.central_square(32, 32)
    assert square.sum() == 256 and square[8:24, 8:24].all()
    small = claims.central_square(4, 4)
    np.testing.assert_array_equal(np.argwhere(small), [[1, 1], [1, 2], [2, 1], [2, 2]])
    # 4x4 image: (1, 1) and (2, 2) central, (0, 3) and (3, 0) not.
    pixels = np.array([[[1, 1, 0, 0, 0]], [[2, 2, 0, 0, 0]], [[0, 3, 0, 0, 0]]])
    np.testing.assert_array_equal(claims.in_centre(pixels, 4, 4), [1, 1, 0])
    out = claims.centre_comparison(pixels, np.array([1, 1, 0], bool), 4, 4)
    assert out["successful"]["successes"] == 2 and out["failed"]["successes"] == 0
    assert out["uniform_share"] == 0.25


def test_centre_mass_by_hand():
    m = np.zeros((4, 4))
    m[1, 1], m[0, 0] = 3.0, 1.0
    assert claims.centre_mass(m) == pytest.approx(0.75)
    assert np.isnan(claims.centre_mass(np.zeros((4, 4))))
    assert claims.centre_mass(-m) == pytest.approx(0.75)  # signed: by magnitude
    assert claims.centre_concentration_verdict(0.5, 0.3, 0.25) == "beyond geometry"
    assert claims.centre_concentration_verdict(0.31, 0.3, 0.25).startswith("geometry")


def test_uniform_positions_in_range_and_independent_of_order():
    key = jax.random.key(0)
    indices = np.arange(50)
    pos = claims.uniform_positions(key, indices, 5, 7)
    assert pos.shape == (50, 2)
    assert pos[:, 0].min() >= 0 and pos[:, 0].max() <= 4 and pos[:, 1].max() <= 6
    perm = np.random.default_rng(0).permutation(50)
    np.testing.assert_array_equal(claims.uniform_positions(key, perm, 5, 7), pos[perm])


def test_generation0_recomputes_what_the_attack_reports(tiny_lenet, random_images):
    module, variables = tiny_lenet
    apply_fn = models.make_apply_fn(module)
    config = attack_de.AttackConfig(population=16, generations=2)
    images = jnp.asarray(random_images[:6])
    pred = np.asarray(jnp.argmax(apply_fn(variables, images), -1))
    # Half the labels are the model's prediction (the attack may need several
    # generations), half another class (every candidate succeeds at generation 0).
    labels = np.where(np.arange(6) % 2 == 0, pred, (pred + 1) % 10).astype(np.int32)
    key, indices = jax.random.key(5), np.arange(100, 106)
    attacked = jax.jit(
        jax.vmap(
            lambda i, x, y: attack_de.attack_image(
                attack_de.image_key(key, i), apply_fn, variables, x, y, config
            )
        )
    )(jnp.asarray(indices), images, jnp.asarray(labels))
    best = jax.jit(
        jax.vmap(
            lambda i, x, y: claims.generation0_best(
                attack_de.image_key(key, i), apply_fn, variables, x, y, config
            )
        )
    )(jnp.asarray(indices), images, jnp.asarray(labels))
    at0 = np.asarray(attacked.generations) == 0
    assert at0.sum() >= 3
    np.testing.assert_array_equal(
        np.asarray(best["reported"])[at0], np.asarray(attacked.pixels)[at0]
    )
    np.testing.assert_array_equal(np.asarray(best["success"])[at0], True)
    # The best member: the lowest p(label) of the population, by brute force.
    gen_key = attack_de.generation_key(attack_de.image_key(key, indices[0]), 0)
    pop = attack_de.decode_candidates(
        attack_de.initial_population(gen_key, config, (32, 32, 3)), (32, 32, 3)
    )
    probs = []
    for p in np.asarray(pop):
        x = np.asarray(random_images[0], np.float32).copy()
        x[p[0, 0], p[0, 1]] = p[0, 2:]
        logits = apply_fn(variables, jnp.asarray(x[None]))
        probs.append(float(jax.nn.softmax(logits)[0, labels[0]]))
    np.testing.assert_array_equal(
        np.asarray(best["best"][0]), pop[int(np.argmin(probs))]
    )
    assert float(best["best_prob_true"][0]) == pytest.approx(min(probs), rel=1e-5)


HEADER = ",".join(results.attack_columns(1))
ATTACK_CSV = "\n".join(
    [
        HEADER,
        "0,3,3,0.9,1,1,5,0.1,0,400,12,21,0,20,255",
        "1,8,8,0.5,1,1,2,0.2,3,1600,4,5,1,2,3",
        "2,1,1,0.7,1,1,2,0.3,0,400,6,7,1,2,3",
        "3,4,4,0.99,1,0,4,0.6,100,40400,1,1,1,2,3",
        "4,5,5,0.995,1,0,5,0.99,100,40400,2,2,1,2,3",
        "5,6,6,0.999,1,0,6,0.992,100,40400,3,3,1,2,3",
        "6,7,2,0.3,0,0,2,0.3,0,0,-1,-1,-1,-1,-1",
    ]
)


def test_figure_examples_on_a_hand_made_attack_csv(tmp_path):
    path = tmp_path / "attack.csv"
    path.write_text(ATTACK_CSV)
    table = results.read_attack_csv(str(path), (32, 32), summary=None)
    ratio = np.array([9.0, 0.1, 0.2, 0.8, 0.3, 0.4, 99.0])
    chosen = claims.figure_examples(table, ratio)
    # Successful p(true) before: 0.9, 0.5, 0.7 -> the median is 0.7 (row 2).
    assert chosen["2"]["row"] == chosen["3"]["row"] == 2
    # Failed: rows 3-5 (row 6 was not attacked despite its ratio).
    assert chosen["5"]["row"] == 3
    # Drops 0.39, 0.005, 0.007: rows 4 and 5 within one point; 5 has the larger ratio.
    assert chosen["6"]["row"] == 5
    ratio[5] = np.nan
    assert claims.figure_examples(table, ratio)["6"]["row"] == 4
    table["prob_true_after"][3:6] = 0.0  # no small drop: the smallest drop
    table["prob_true_before"][3:6] = [0.9, 0.8, 0.95]
    assert claims.figure_examples(table, ratio)["6"]["row"] == 4


def test_moved_by_one_and_neighbours():
    assert claims.neighbours(0, 0, 4, 4) == [(0, 1), (1, 0), (1, 1)]
    assert len(claims.neighbours(2, 2, 5, 5)) == 8
    assert claims.moved_by_one({(1, 2): 0.3, (0, 1): 0.7, (2, 2): 0.7}) == (0, 1)
    with pytest.raises(PropmapsError):
        claims.moved_by_one({})


def test_selection_rules_by_hand():
    values = np.array([5.0, 1.0, 3.0, 2.0, 4.0])
    assert claims.median_row(values, np.ones(5, bool)) == 2
    assert claims.median_row(values, np.array([1, 1, 0, 1, 0], bool)) == 3
    assert claims.argmax_row(values, np.array([0, 1, 1, 1, 0], bool)) == 2
    with pytest.raises(PropmapsError):
        claims.argmax_row(values, np.zeros(5, bool))


def test_post_activation_and_signed_summaries_against_numpy(tiny_resnet):
    rng = np.random.default_rng(4)
    fm = rng.normal(size=(2, 4, 5, 6)).astype(np.float32)
    fm_adv = fm + rng.normal(scale=0.8, size=fm.shape).astype(np.float32)
    out = jax.device_get(
        propagation.layer_summaries(jnp.asarray(fm), jnp.asarray(fm_adv), signed=True)
    )
    d = fm.astype(np.float64) - fm_adv
    fm_max = fm.astype(np.float64).max(axis=(1, 2, 3))
    np.testing.assert_allclose(out["max_abs_diff"], d.max(axis=(1, 2, 3)), rtol=1e-5)
    np.testing.assert_allclose(
        out["mean_abs_diff"], d.mean(axis=(1, 2, 3)), rtol=1e-4, atol=1e-6
    )
    strong = (np.abs(d).max(-1) > 0.5 * fm_max[:, None, None]).mean((1, 2))
    absolute = jax.device_get(
        propagation.layer_summaries(jnp.asarray(fm), jnp.asarray(fm_adv))
    )
    np.testing.assert_allclose(absolute["spread_strong"], strong)
    # bn_relu: ReLU of every BatchNorm output, as the model computes it.
    module, variables = tiny_resnet
    images = rng.integers(0, 256, (2, 32, 32, 3)).astype(np.float32)
    # Both forwards compiled, each as one program (not op by op).
    _, _, maps, _ = jax.jit(propagation.paired_feature_maps, static_argnums=0)(
        models.linen_features(module, "bn_relu"), variables, images, images
    )
    _, raw = jax.jit(
        lambda v, x: models.layer_outputs(
            module, v, x, models.is_batch_norm, train=False
        )
    )(variables, jnp.asarray(images))
    assert list(maps)[0] == "stage1_block1/bn1" and list(maps)[-1] == "bn_final"
    for name in raw:
        np.testing.assert_allclose(
            maps[name], np.maximum(raw[name], 0.0), rtol=1e-5, atol=1e-6
        )
    with pytest.raises(PropmapsError, match="layer kind"):
        models.linen_features(module, "post")
    lenet = models.create_model("lenet_tiny")
    with pytest.raises(PropmapsError, match="gives no layer"):
        propagation.paired_feature_maps(
            models.linen_features(lenet, "bn_relu"),
            models.init_variables(lenet, jax.random.key(0)),
            images,
            images,
        )


# --- Each claim as the paper means it: primary statistics and verdicts.


def test_every_claim_declares_one_primary_statistic_and_why():
    assert [c.key for c in claims.CLAIMS] == [
        "close_to_max",
        "same_across_layers",
        "failed_farther_from_centre",
        "quarter_of_last_map",
        "centre_concentration",
        "figure9_similar",
    ]
    for claim in claims.CLAIMS:
        assert claim.words and claim.layers and claim.primary and claim.why
        assert claim.secondary and claim.rule
        record = claims.claim_record(claim, {"primary": 1, "verdict": "holds"})
        assert record["primary_statistic"] == claim.primary
        assert record["primary"] == 1 and record["verdict"] == "holds"
    assert "last layer" in claims.CLAIM["close_to_max"].layers


def test_close_to_max_is_read_in_the_last_layer():
    # The first layer reaches the maximum everywhere, the last one in 1 of 4
    # successful attacks; the failed attacks reach it in the last layer.
    ratio = np.array(
        [[1.0, 0.95], [1.0, 0.2], [1.0, 0.3], [1.0, 0.1], [1.0, 0.99], [1.0, 0.98]]
    )
    success = np.array([1, 1, 1, 1, 0, 0], bool)
    out = claims.claim_close_to_max(ratio, success, ["stem", "last"])
    assert out["primary"]["layer"] == "last"
    assert (out["primary"]["successes"], out["primary"]["n"]) == (1, 4)
    assert out["secondary"]["failed_last_layer"]["successes"] == 2
    assert out["secondary"]["best_layer"] == "stem"
    assert out["secondary"]["per_layer"]["successful"]["0.9"][0]["successes"] == 4
    assert out["verdict"] == "rarely"  # 1/4: the Wilson interval reaches below 5%

    def verdict(reaching, n):
        last = np.r_[np.ones(reaching), np.zeros(n - reaching)]
        values = np.stack([np.ones(n), last], axis=1)
        return claims.claim_close_to_max(values, np.ones(n, bool), ["a", "b"])[
            "verdict"
        ]

    assert verdict(40, 40) == "holds"
    assert verdict(30, 100) == "sometimes"
    assert verdict(0, 100) == "rarely"


def _summaries_of(diff_positions: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Per-image scalars (N, 2) of two hand-made layers from `layer_summaries`."""
    out = {}
    for j, diff in enumerate(diff_positions):
        fm = np.zeros((2, 4, 4, 2), np.float32)
        fm[:, 0, 0, 0] = 2.0  # every layer's max FM is 2
        s = jax.device_get(
            propagation.layer_summaries(jnp.asarray(fm), jnp.asarray(fm + diff))
        )
        for name, value in s.items():
            out.setdefault(name, np.zeros((2, len(diff_positions))))[:, j] = value
    return out


def test_same_across_layers_reads_the_peak_as_figure_3_shows_it():
    # Layer 1: a difference of 1 at one position in both channels; layer 2: 1
    # everywhere. The peak of PM_avg is 1 (half of max FM) in both; the spatial
    # mean grows 16-fold as the map spreads.
    spot = np.zeros((2, 4, 4, 2), np.float32)
    spot[:, 1, 2, :] = 1.0
    everywhere = np.ones((2, 4, 4, 2), np.float32)
    scalars = _summaries_of([spot, everywhere])
    np.testing.assert_allclose(scalars["pm_avg_peak"], 1.0)
    np.testing.assert_allclose(scalars["mean_abs_diff"], [[1 / 16, 1]] * 2)
    out = claims.claim_same_across_layers(scalars, np.array([1, 0], bool))
    primary = out["primary"]
    assert primary["statistic"] == "peak PM_avg / max FM"
    assert [p["mean"] for p in primary["per_layer"]] == pytest.approx([0.5, 0.5])
    assert primary["largest_over_smallest"]["ratio"] == pytest.approx(1.0)
    assert out["verdict"] == "holds"
    mean = out["secondary"]["mean PM_avg"]["successful"]
    assert mean["largest_over_smallest"]["ratio"] == pytest.approx(16.0)
    assert mean["verdict"] == "fails"
    # The peak five times larger in the last layer: fails; noisy: undecided.
    scalars["pm_avg_peak"][:, 1] = 5.0
    assert claims.claim_same_across_layers(scalars, np.array([1, 1], bool))[
        "verdict"
    ] == ("fails")
    rng = np.random.default_rng(0)
    noisy = {
        "pm_avg_peak": np.c_[np.ones(6), rng.choice([0.5, 4.0], 6)],
        "fm_max": np.ones((6, 2)),
        "mean_abs_diff": np.ones((6, 2)),
        "mean_abs_fm": np.ones((6, 2)),
    }
    noisy["pm_avg_peak"][:2, 1] = [0.5, 4.0]
    assert (
        claims.claim_same_across_layers(noisy, np.ones(6, bool))["verdict"]
        == "undecided"
    )


def test_failed_farther_from_centre_by_hand():
    def pixels(positions):
        return np.array([[[r, c, 0, 0, 0]] for r, c in positions])

    # 4x4: (1, 1) and (2, 2) central; (0, 0) and (3, 3) not.
    central, edge = (1, 1), (0, 3)
    success = np.array([1] * 30 + [0] * 30, bool)
    apart = pixels([central] * 30 + [edge] * 30)
    out = claims.claim_failed_farther(apart, success, 4, 4, generation0_best=apart)
    assert out["primary"]["successful"]["successes"] == 30
    assert out["primary"]["failed"]["successes"] == 0
    assert out["secondary"]["uniform_share"] == 0.25
    assert out["secondary"]["generation0"]["verdict_if_primary"] == "holds"
    assert out["verdict"] == "holds"
    reversed_ = pixels([edge] * 30 + [central] * 30)
    assert claims.claim_failed_farther(reversed_, success, 4, 4)["verdict"].startswith(
        "reversed"
    )
    mixed = pixels(([central, edge] * 30))
    assert (
        claims.claim_failed_farther(mixed, success, 4, 4)["verdict"]
        == "no difference between outcomes"
    )
    assert claims.claim_failed_farther(apart[:30], success[:30], 4, 4)[
        "verdict"
    ].startswith("undecided")


def test_quarter_of_last_map_verdicts():
    def verdict(strong_attacks, n):
        strong = np.r_[np.full(strong_attacks, 0.4), np.full(n - strong_attacks, 0.1)]
        return claims.claim_quarter(strong, strong, np.ones(n, bool))

    out = verdict(40, 40)
    assert out["verdict"] == "holds" and out["primary"]["successes"] == 40
    assert verdict(30, 100)["verdict"] == "sometimes"
    assert verdict(0, 100)["verdict"] == "rarely"
    # Exactly a quarter is not more than a quarter.
    exact = claims.claim_quarter(np.full(3, 0.25), np.full(3, 0.25), np.ones(3, bool))
    assert exact["primary"]["successes"] == 0


def test_centre_concentration_against_the_distance_matched_control():
    def central_map(mass):
        m = np.zeros((4, 4))
        m[1, 1], m[0, 0] = mass, 1.0 - mass
        return m

    attacks = {"successful": central_map(0.75), "failed": central_map(0.5)}

    def run(matched):
        maps = {
            "attacks": attacks,
            "distance_matched": {"successful": central_map(matched)},
            "uniform_positions": {"successful": central_map(0.3)},
        }
        pixels = np.array([[[1, 1, 0, 0, 0]], [[0, 0, 0, 0, 0]]])
        return claims.claim_centre_concentration(
            maps, pixels, np.array([1, 0], bool), (4, 4)
        )

    out = run(0.74)
    assert out["primary"]["excess"] == pytest.approx(0.01)
    assert out["verdict"].startswith("mostly geometry")
    ok = out["secondary"]["successful"]
    assert ok["central_mass_share"]["uniform_positions"] == pytest.approx(0.3)
    assert ok["pixels_in_central_square"]["successes"] == 1
    assert np.isnan(out["secondary"]["failed"]["excess_over_distance_matched"])
    assert out["secondary"]["share_of_positions"] == 0.25
    assert run(0.5)["verdict"].startswith("beyond geometry")
    assert run(0.9)["verdict"].startswith("less central")
    assert claims.matched_concentration_verdict(float("nan")) == "undecided"


def test_distance_matched_positions_keep_each_attack_distance():
    key = jax.random.key(0)
    positions = np.array([[15, 16], [0, 5], [31, 31], [10, 20]] * 25)
    indices = np.arange(100)
    drawn = claims.distance_matched_positions(key, indices, positions, 32, 32)
    assert drawn.shape == (100, 2) and drawn.min() >= 0 and drawn.max() <= 31
    np.testing.assert_array_equal(
        stats.distance_from_centre(drawn, 32, 32),
        stats.distance_from_centre(positions, 32, 32),
    )
    # Drawn around the ring, not the attack's own position.
    outer = drawn[positions[:, 0] == 0]
    assert len({tuple(p) for p in outer}) > 5
    perm = np.random.default_rng(1).permutation(100)
    np.testing.assert_array_equal(
        claims.distance_matched_positions(key, indices[perm], positions[perm], 32, 32),
        drawn[perm],
    )


def test_figure9_ratio_and_its_per_image_normalisation():
    # Failed attacks move their maps 10% more, on images twice as strong: raw,
    # failed are higher; divided by each image's own mean |FM|, lower.
    success = np.array([1] * 20 + [0] * 20, bool)
    diff = np.where(success[:, None], 1.0, 1.1) * np.ones((40, 2))
    fm = np.where(success[:, None], 1.0, 2.0) * np.ones((40, 2))
    out = claims.claim_figure9(diff, fm, success, ["a", "b"])
    raw = out["primary"]["failed_over_successful"]
    assert [r["ratio"] for r in raw] == pytest.approx([1.1, 1.1])
    assert out["primary"]["failed_higher_in_layers"] == ["a", "b"]
    own = out["secondary"]["divided_by_own_mean_abs_fm"]
    assert [r["ratio"] for r in own["failed_over_successful"]] == pytest.approx(
        [0.55, 0.55]
    )
    assert own["failed_higher_in_layers"] == []
    assert out["verdict"] == "holds (similar)"
    diff[~success] = 2.0
    assert claims.claim_figure9(diff, fm, success, ["a", "b"])["verdict"] == "differ"
    # A ratio of 1.2 between widely spread values: the interval straddles 1.25.
    noisy = np.where(success, np.tile([0.2, 1.8], 20), np.tile([0.2, 2.2], 20))
    noisy = np.stack([noisy, noisy], axis=1)
    assert (
        claims.claim_figure9(noisy, fm, success, ["a", "b"])["verdict"] == "undecided"
    )
    one_outcome = claims.claim_figure9(diff, fm, np.ones(40, bool), ["a", "b"])
    assert one_outcome["verdict"].startswith("undecided")


def test_provenance_prospective_retrospective_unknown():
    early, late = "2026-11-01T10:00:00+00:00", "2026-12-01T10:00:00+01:00"
    assert claims.provenance(early, late)["status"] == "prospective"
    assert claims.provenance(late, early)["status"] == "retrospective"
    assert claims.provenance(late, late)["status"] == "retrospective"
    assert claims.provenance(None, late)["status"] == "unknown"
    assert claims.provenance(early, None)["status"] == "unknown"
    modified = claims.provenance(early, late, rules_modified=True)
    assert modified["status"] == "retrospective"
    assert modified["rules_committed"] == early
    with pytest.raises(PropmapsError, match="time zone"):
        claims.provenance("2026-11-01T10:00:00", late)
