"""The locality controls: statistics against closed forms / scipy, the draws."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from propmaps_jax import stats
from propmaps_jax.analysis import locality
from propmaps_jax.analysis import locality_controls as lc
from propmaps_jax.errors import PropmapsError
from propmaps_jax.results import locality_csv


@pytest.mark.parametrize("b,c", [(0, 0), (3, 0), (7, 2), (20, 31), (148, 23)])
def test_mcnemar_exact_matches_scipy_binomtest(b, c):
    expected = 1.0 if b + c == 0 else scipy.stats.binomtest(b, b + c, 0.5).pvalue
    assert stats.mcnemar_exact(b, c) == pytest.approx(expected, rel=1e-12)
    # Closed form for c = 0: p = 2 / 2^b.
    if c == 0 and b:
        assert stats.mcnemar_exact(b, 0) == pytest.approx(min(1.0, 2.0 / 2**b))
    with pytest.raises(PropmapsError):
        stats.mcnemar_exact(-1, 2)


def test_paired_test_counts_and_winner():
    first = np.array([1, 1, 1, 1, 1, 1, 1, 0, 0, 1], bool)
    second = np.array([0, 0, 0, 0, 0, 0, 0, 0, 1, 1], bool)
    t = lc.paired_test(first, second)
    assert (t["both"], t["only_first"], t["only_second"], t["neither"]) == (1, 7, 1, 1)
    assert t["difference"] == pytest.approx(0.6)
    assert t["mcnemar_p"] == pytest.approx(2 * (1 + 8) / 2**8)  # 0.0703
    assert t["winner"] == "none shown"
    assert lc.paired_test(np.ones(8, bool), np.zeros(8, bool))["winner"] == "first"
    assert lc.paired_test(np.zeros(8, bool), np.ones(8, bool))["winner"] == "second"


def test_logistic_fit_binary_covariate_is_the_log_odds():
    # Two groups: the MLE is the saturated model, logit of each group's rate.
    design = np.array([[1.0, 0.0], [1.0, 1.0]])
    successes, trials = np.array([3.0, 12.0]), np.array([10.0, 16.0])
    beta, ok = stats.logistic_fit(design, successes, trials)
    logit = lambda p: math.log(p / (1 - p))  # noqa: E731
    assert ok
    np.testing.assert_allclose(beta, [logit(0.3), logit(0.75) - logit(0.3)], 1e-9)
    # Bernoulli rows give the same fit as their binomial sums; weights = copies.
    rows = np.repeat(design, [10, 16], axis=0)
    y = np.r_[np.ones(3), np.zeros(7), np.ones(12), np.zeros(4)]
    np.testing.assert_allclose(stats.logistic_fit(rows, y, np.ones(26))[0], beta, 1e-9)
    weights = np.array([[2.0, 2.0], [1.0, 0.0]])
    b2, ok2 = stats.logistic_fit(design, successes, trials, weights)
    np.testing.assert_allclose(b2[0], beta, 1e-9)
    # One group only: the slope is not identified, the fit is reported failed.
    assert not ok2[1] and np.all(np.isnan(b2[1]))


def test_logistic_fit_separation_is_a_failed_fit():
    design = np.array([[1.0, 0.0], [1.0, 1.0]])
    beta, ok = stats.logistic_fit(design, np.array([0.0, 5.0]), np.array([5.0, 5.0]))
    assert not ok and np.all(np.isnan(beta))


def test_bootstrap_counts_and_percentile_interval():
    counts = stats.bootstrap_counts(np.random.default_rng(0), 7, 50)
    assert counts.shape == (50, 7) and np.all(counts.sum(1) == 7)
    assert stats.percentile_interval(np.arange(101.0)) == pytest.approx((2.5, 97.5))
    assert all(math.isnan(v) for v in stats.percentile_interval([1.0, np.nan]))


def test_quartile_groups():
    groups, cuts = stats.quartile_groups([0.0, 1.0, 2.0, 2.5, 9.0], np.arange(9.0))
    np.testing.assert_allclose(cuts, [2.0, 4.0, 6.0])
    np.testing.assert_array_equal(groups, [0, 0, 0, 1, 3])


def test_clean_margin():
    probs = jnp.array([[0.7, 0.2, 0.1], [0.1, 0.5, 0.4]])
    np.testing.assert_allclose(lc.clean_margin(probs, jnp.array([0, 2])), [0.5, -0.1])


def test_context_matched_draw_respects_the_tolerance():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (12, 12, 3)).astype(np.float32)
    row, col = 5, 6
    # Two planted copies of the attack position's window: far (3, 3 away) and
    # near (distance 2, excluded: its window overlaps the attack's).
    window = image[row - 1 : row + 2, col - 1 : col + 2].copy()
    image[1:4, 1:4] = window  # centre (2, 2): Chebyshev distance 4
    image[8:11, 7:10] = window + 5.0  # centre (9, 8): distance 4, diff 5
    mask, distance = lc.context_candidates(jnp.asarray(image), row, col, 6.0, 3)
    # Independent float64 check of the distance at the planted centres.
    f = np.pad(image.astype(np.float64), ((1, 1), (1, 1), (0, 0)), "edge")

    def win(r, c):
        return f[r : r + 3, c : c + 3].reshape(-1)

    expected = np.array(
        [
            [np.abs(win(r, c) - win(row, col)).mean() for c in range(12)]
            for r in range(12)
        ]
    )
    np.testing.assert_allclose(distance, expected, atol=1e-4)
    want = (expected <= 6.0) & (
        np.maximum(*np.abs(np.indices((12, 12)) - np.array([row, col])[:, None, None]))
        >= 3
    )
    np.testing.assert_array_equal(mask, want)
    assert want[2, 2] and want[9, 8] and not want[row, col]
    keys = jax.random.split(jax.random.key(0), 20)
    draws = [
        lc.sample_context_matched(k, jnp.asarray(image), row, col, 6.0, 3) for k in keys
    ]
    for r, c, found, count, d in draws:
        assert bool(found) and int(count) == want.sum()
        assert want[int(r), int(c)] and float(d) <= 6.0
    # Tolerance 0 with no exact copy far away: nothing qualifies, reported.
    image[1:4, 1:4] += 1.0
    image[8:11, 7:10] += 1.0
    r, c, found, count, _ = lc.sample_context_matched(
        keys[0], jnp.asarray(image), row, col, 0.0, 3
    )
    assert not bool(found) and int(count) == 0 and (int(r), int(c)) == (row, col)


def test_draw_controls_per_image_keys_do_not_depend_on_batching():
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (5, 8, 8, 3)).astype(np.uint8)
    pixels = np.array(
        [[[r, c, 1, 2, 3]] for r, c in [(0, 0), (3, 4), (7, 7), (2, 5), (4, 1)]]
    )
    indices = np.array([11, 3, 40, 7, 9])
    nearby, _ = locality.protocol_moves(
        0, indices, pixels[:, 0, 0], pixels[:, 0, 1], 8, 8
    )
    whole = lc.draw_controls(0, indices, images, pixels, nearby, tolerance=80.0)
    part = lc.draw_controls(0, indices[2:], images[2:], pixels[2:], nearby[2:], 80.0)
    for a, b in zip(whole, part, strict=True):
        np.testing.assert_array_equal(a[2:], b)
    assert np.all((whole.own_colour >= 0) & (whole.own_colour <= 255))
    assert not np.array_equal(whole.own_colour, whole.nearby_colour)
    other = lc.draw_controls(1, indices, images, pixels, nearby, tolerance=80.0)
    assert not np.array_equal(whole.own_colour, other.own_colour)


# ----- the statistics on a tiny hand-made attack.csv / locality.csv --------------

ATTACK_HEADER = (
    "index,label,pred_before,prob_true_before,attacked,success,pred_after,"
    "prob_true_after,generations,evaluations,row_1,col_1,r_1,g_1,b_1"
)
LOCALITY_HEADER = (
    "index,label,row,col,r,g,b,nearby_row,nearby_col,nearby_pred,nearby_success,"
    "random_row,random_col,random_pred,random_success,ring1_n,ring1_success,"
    "ring2_n,ring2_success"
)
ATTACK_CSV = (
    ATTACK_HEADER
    + """
0,1,1,0.9,1,1,2,0.3,0,8,5,5,1,2,3
1,1,1,0.9,1,1,2,0.3,0,8,2,3,1,2,3
2,1,1,0.9,1,1,2,0.3,0,8,7,7,1,2,3
3,1,1,0.9,1,1,2,0.3,2,24,0,0,1,2,3
4,1,1,0.9,1,1,2,0.3,1,16,4,4,1,2,3
5,1,1,0.9,1,0,1,0.8,3,32,1,1,1,2,3
6,1,1,0.9,1,0,1,0.8,3,32,6,1,1,2,3
7,1,2,0.1,0,0,2,0.1,0,0,-1,-1,-1,-1,-1
"""
)
LOCALITY_CSV = (
    LOCALITY_HEADER
    + """
0,1,5,5,1,2,3,4,4,2,1,0,0,1,0,8,6,16,4
1,1,2,3,1,2,3,1,3,2,1,7,7,2,1,8,4,16,8
2,1,7,7,1,2,3,6,6,1,0,0,0,1,0,3,0,5,0
3,1,0,0,1,2,3,1,1,2,1,7,3,1,0,3,3,5,1
4,1,4,4,1,2,3,5,5,2,1,1,7,1,0,8,2,16,0
"""
)


@pytest.fixture
def hand_made(tmp_path):
    from propmaps_jax.analysis import locality_study
    from propmaps_jax.results.attack_csv import read_attack_csv

    (tmp_path / "attack.csv").write_text(ATTACK_CSV)
    (tmp_path / "locality.csv").write_text(LOCALITY_CSV)
    table = read_attack_csv(str(tmp_path / "attack.csv"), (8, 8), summary=None)
    moved = locality_csv.read(str(tmp_path / "locality.csv"), max_distance=2)
    # Clean margins of the 7 attacked images (attack.csv order).
    margin = np.array([0.1, 0.2, 0.3, 0.7, 0.9, 0.5, 0.8])
    attacked, per_attack = locality_study.controls_inputs(table, moved, margin)
    per_attack.update(
        own_random_colour_success=np.array([1, 0, 0, 1, 0], bool),
        nearby_random_colour_success=np.array([0, 1, 0, 1, 0], bool),
        context_success=np.array([1, 1, 0, 0, 1], bool),
        context_found=np.array([1, 1, 1, 0, 1], bool),
        context_candidates=np.array([4, 9, 2, 0, 1]),
        context_distance=np.array([3.0, 5.0, 1.0, 0.0, 7.0]),
        nearby_context_distance=np.array([2.0, 4.0, 6.0, 8.0, 10.0]),
    )
    return attacked, per_attack


def test_strata_on_hand_made_csvs(hand_made):
    attacked, per_attack = hand_made
    np.testing.assert_array_equal(per_attack["generation0"], [1, 1, 1, 0, 0])
    # Chebyshev distance of each random move from its attack.
    np.testing.assert_array_equal(per_attack["random_distance"], [5, 5, 7, 7, 3])
    # Quartiles of the 7 margins: 0.25, 0.5, 0.75 (np.quantile, linear).
    np.testing.assert_allclose(attacked["cuts"], [0.25, 0.5, 0.75])
    np.testing.assert_array_equal(attacked["quartile"], [0, 0, 1, 2, 3, 1, 3])
    result = lc.summarise_controls(
        per_attack, attacked, np.random.default_rng(0), resamples=50
    )
    s = result["strata"]
    assert s["generation 0"]["successful_attacks"] == 3
    assert s["generation 0"]["nearby"]["successes"] == 2
    assert s["search"]["nearby"]["successes"] == 2
    assert s["generation 0"]["random"]["successes"] == 1
    # Rings pooled over the stratum's images: gen 0 ring 1 = (6+4+0)/(8+8+3).
    assert (
        s["generation 0"]["rings"][0]["successes"],
        s["generation 0"]["rings"][0]["n"],
    ) == (10, 19)
    assert (s["search"]["rings"][1]["successes"], s["search"]["rings"][1]["n"]) == (
        1,
        21,
    )
    # Original rate per margin quartile, over the attacked images of the quartile.
    q = [s[f"margin Q{i}"]["original_correct"] for i in range(1, 5)]
    assert [(p["successes"], p["n"]) for p in q] == [(2, 2), (1, 2), (1, 1), (1, 2)]
    assert s["all"]["original_correct"]["successes"] == 5
    assert s["all"]["original_correct"]["n"] == 7
    # The context-matched rate counts only attacks where a position was found.
    assert (s["all"]["context"]["successes"], s["all"]["context"]["n"]) == (3, 4)
    assert s["all"]["context_not_found"] == 1
    # Nearby vs random, all attacks: nearby-only 3 (0, 3, 4), random-only 0.
    t = s["all"]["nearby_vs_random"]
    assert (t["only_first"], t["only_second"], t["both"], t["neither"]) == (3, 0, 1, 1)
    assert t["mcnemar_p"] == pytest.approx(0.25)
    c4 = next(c for c in result["controls"] if c["id"] == "C4")
    # Nearby vs context-matched on the 4 attacks with a match: both succeed in 3.
    assert c4["n"] == 4 and (c4["both"], c4["only_first"], c4["only_second"]) == (
        3,
        0,
        0,
    )
    assert result["context"]["median_candidates"] == pytest.approx(3.0)
    # Five images: no stratum holds MIN_STRATUM attacks, so no verdict can be given.
    assert result["verdict"]["outcome"] == "inconclusive"


def test_distance_design_rows(hand_made):
    _, per_attack = hand_made
    design, y, trials, image = lc.distance_design(per_attack, adjusted=True)
    # Per image: ring 1, ring 2, the random move.
    assert design.shape == (15, 4)
    np.testing.assert_array_equal(design[:3, 1], [1, 2, 5])
    np.testing.assert_array_equal(y[:3], [6, 4, 0])
    np.testing.assert_array_equal(trials[:3], [8, 16, 1])
    np.testing.assert_allclose(design[:3, 2], 0.1)
    np.testing.assert_array_equal(design[:, 3], np.repeat([1, 1, 1, 0, 0], 3))
    np.testing.assert_array_equal(image, np.repeat(np.arange(5), 3))


def _strata(counts, tests):
    out = {s: {"successful_attacks": counts.get(s, 0)} for s in lc.STRATA}
    for s, (b, c) in tests.items():
        out[s]["nearby_vs_random"] = lc.paired_test(
            np.r_[np.ones(b), np.zeros(c)].astype(bool),
            np.r_[np.zeros(b), np.ones(c)].astype(bool),
        )
    return out


def test_verdict_rule_branches():
    big = {s: 40 for s in lc.STRATA}
    wins = {s: (12, 1) for s in lc.STRATA[1:]}
    negative = {"distance": {"ci_low": -0.5, "ci_high": -0.1}}
    assert lc.verdict(_strata(big, wins), negative)["outcome"] == "supported"
    # A small stratum (< MIN_STRATUM) does not count, whatever it shows.
    small = {**big, "margin Q4": 5}
    tie = {**wins, "margin Q4": (2, 2)}
    assert lc.verdict(_strata(small, tie), negative)["outcome"] == "supported"
    assert lc.verdict(_strata(big, tie), negative)["outcome"] == "inconclusive"
    reverse = {**wins, "search": (1, 12)}
    assert lc.verdict(_strata(big, reverse), negative)["outcome"] == "not supported"
    flat = {"distance": {"ci_low": 0.0, "ci_high": 0.2}}
    assert lc.verdict(_strata(big, wins), flat)["outcome"] == "not supported"
    straddle = {"distance": {"ci_low": -0.2, "ci_high": 0.1}}
    assert lc.verdict(_strata(big, wins), straddle)["outcome"] == "inconclusive"


def test_old_or_broken_locality_csv_is_one_line(tmp_path):

    old = tmp_path / "lenet" / "locality.csv"
    old.parent.mkdir()
    old.write_text(
        "index,label,row,col,r,g,b,nearby_row,nearby_col,nearby_success,"
        "random_row,random_col,random_success\n1,2,3,4,5,6,7,8,9,1,2,3,0\n"
    )
    with pytest.raises(PropmapsError) as e:
        locality_csv.read(str(old), max_distance=2)
    message = str(e.value)
    assert "\n" not in message and "older version" in message
    assert "locality.json" in message and "run the locality experiment again" in message
    (tmp_path / "lenet" / "locality.csv").write_text(
        LOCALITY_CSV.replace("6,16,4", "6,x,4")
    )
    with pytest.raises(PropmapsError, match="not an integer"):
        locality_csv.read(str(old), max_distance=2)
    with pytest.raises(PropmapsError, match="another --max_distance"):
        (tmp_path / "lenet" / "locality.csv").write_text(LOCALITY_CSV)
        locality_csv.read(str(old), max_distance=3)


def test_attack_csv_without_generations_is_one_line(tmp_path):
    from propmaps_jax.results.attack_csv import read_attack_csv

    lines = ATTACK_CSV.splitlines()
    drop = lines[0].split(",").index("generations")
    text = "\n".join(
        ",".join(v for j, v in enumerate(line.split(",")) if j != drop)
        for line in lines
    )
    (tmp_path / "attack.csv").write_text(text + "\n")
    with pytest.raises(PropmapsError) as e:
        read_attack_csv(str(tmp_path / "attack.csv"), summary=None)
    assert "missing generations" in str(e.value) and "run the attack again" in str(
        e.value
    )


def test_seeds_markdown_spread():
    from experiments.report import tables

    def record(k):
        prop = stats.proportion
        return {
            "original_all": prop(40 + k, 100),
            "original_correct": prop(40 + k, 80),
            "random": prop(k, 40 + k),
            "nearby": prop(10 + k, 40 + k),
            "distance": [{"pooled": prop(5, 10)}],
        }

    md = tables.seeds_markdown({0: record(0), 1: record(2), 2: record(4)})
    rates = np.array([40.0, 42.0, 44.0]) / 100
    assert f"{100 * rates.mean():.1f} ± {100 * rates.std(ddof=1):.1f}%" in md
    assert "42.0 ± 2.0%" in md and "| seed 0 | seed 1 | seed 2 |" in md
    assert "ring d = 1" in md and "verdict" not in md


def test_no_successful_attack_gives_an_inconclusive_table():
    from experiments.report import tables

    empty_bool, empty_int = np.zeros(0, bool), np.zeros(0, np.int64)
    per_attack = {
        "generation0": empty_bool,
        "margin": np.zeros(0),
        "quartile": empty_int,
        "ring_n": np.zeros((0, 2), np.int64),
        "ring_success": np.zeros((0, 2), np.int64),
        "random_distance": empty_int,
        "context_found": empty_bool,
        "context_candidates": empty_int,
        "context_distance": np.zeros(0),
        "nearby_context_distance": np.zeros(0),
        **{f"{m}_success": empty_bool for m, _ in lc.MOVES},
    }
    margin = np.array([0.2, 0.5, 0.9])
    quartile, _ = stats.quartile_groups(margin, margin)
    attacked = {"success": np.zeros(3, bool), "quartile": quartile, "margin": margin}
    result = lc.summarise_controls(per_attack, attacked, np.random.default_rng(0), 20)
    assert result["verdict"]["outcome"] == "inconclusive"
    assert result["strata"]["all"]["original_correct"]["n"] == 3
    assert result["distance_models"]["adjusted"]["distance"]["estimate"] is None
    md = tables.controls_markdown(
        {"m": {"controls": {**result, "settings": {"bootstrap": 20}}}}, {}
    )
    assert "inconclusive" in md and "None" not in md


def _ring_attacks(n, rng):
    """n successful attacks whose ring success falls with distance (slope -1)."""
    ring_n = np.tile([8, 16, 24], (n, 1))
    p = 1.0 / (1.0 + np.exp(-(1.0 - np.arange(1, 4))))
    return {
        "ring_n": ring_n,
        "ring_success": rng.binomial(ring_n, p),
        "random_distance": rng.integers(4, 20, n),
        "random_success": rng.random(n) < 0.02,
        "margin": rng.random(n),
        "generation0": rng.random(n) < 0.5,
    }


def test_distance_model_is_not_fitted_on_too_few_attacks():
    from experiments.report import tables

    rng = np.random.default_rng(3)
    few = _ring_attacks(lc.MIN_STRATUM - 1, rng)
    model = lc.distance_model(few, True, np.random.default_rng(0), 50)
    assert model["too_few"] and model["images"] == lc.MIN_STRATUM - 1
    assert all(model[k]["estimate"] is None for k in lc.COEFFICIENTS[True])
    assert tables._coefficient(model, "distance") == (
        f"not fitted: {lc.MIN_STRATUM - 1} attacks (< {lc.MIN_STRATUM})"
    )
    reasons = lc.verdict(_strata({}, {}), model)["reasons"]
    assert any("not fitted on fewer than" in r for r in reasons)
    assert not any("interval includes 0" in r for r in reasons)
    # From MIN_STRATUM on, the fit is made and its interval has a width.
    enough = _ring_attacks(lc.MIN_STRATUM, rng)
    model = lc.distance_model(enough, True, np.random.default_rng(0), 50)
    slope = model["distance"]
    assert not model["too_few"] and slope["ci_low"] < slope["ci_high"] < 0
    assert tables._coefficient(model, "distance").startswith(
        f"{slope['estimate']:+.3f} ("
    )
