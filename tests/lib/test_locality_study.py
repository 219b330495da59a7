"""propmaps_jax.analysis.locality_study: the one call on a user's own model,
checked against a hand-computed case."""

import jax.numpy as jnp
import numpy as np
import pytest

from propmaps_jax.analysis import locality_study
from propmaps_jax.attack import AttackResult

H = W = 4


def column_model(variables, images):
    """Fooled (class 1) iff a pixel of column 0 has red > 128; else class 0."""
    red = jnp.asarray(images, jnp.float32)[:, :, 0, 0]
    fooled = jnp.max(red, axis=1) > 128
    logit = jnp.where(fooled, 2.5, -2.5) * variables
    return jnp.stack([jnp.zeros(len(images)), logit], axis=1)


def tiny_case():
    """Three black 4x4 images: 0 attacked and fooled at (1, 0) by pure red; 1
    attacked, not fooled; 2 misclassified (label 1), its attack's success must not
    count."""
    images = np.zeros((3, H, W, 3), np.uint8)
    labels = np.array([0, 0, 1])
    attack = AttackResult(
        success=np.array([True, False, True]),
        pixels=np.array([[[1, 0, 255, 0, 0]], [[2, 3, 9, 9, 9]], [[0, 0, 255, 0, 0]]]),
        prob_true_after=np.array([0.1, 0.9, 0.1], np.float32),
        pred_after=np.array([1, 0, 0], np.int32),
        generations=np.array([0, 5, 0], np.int32),
        evaluations=np.array([8, 48, 8]),
        search_rejections=np.zeros(3, np.int32),
    )
    return images, labels, attack


def test_locality_study_on_a_tiny_model_matches_the_hand_computed_rings():
    images, labels, attack = tiny_case()
    study = locality_study.locality_study(
        column_model,
        jnp.float32(1.0),
        images,
        labels,
        attack,
        max_distance=3,
        vulnerability_maps=1,
        controls=True,
        batch_size=16,
    )
    summary = study.summary
    counts = {
        k: (summary[k]["successes"], summary[k]["n"])
        for k in summary
        if k in ("accuracy_on_samples", "original_all", "original_correct")
    }
    # Image 2 is misclassified: not attacked, so its "success" is not one.
    assert counts == {
        "accuracy_on_samples": (2, 3),
        "original_all": (1, 3),
        "original_correct": (1, 2),
    }
    # Around (1, 0) in a 4x4 image, by hand: d=1 has 5 positions inside, of which
    # (0, 0) and (2, 0) are in column 0; d=2 has 6, of which (3, 0); d=3 has the
    # 4 positions of column 3, none fooling.
    rings = [(r["pooled"]["successes"], r["pooled"]["n"]) for r in summary["distance"]]
    assert rings == [(2, 5), (1, 6), (0, 4)]
    # Nearby and random succeed exactly where the moved colour is in column 0.
    for move in ("nearby", "random"):
        assert study.moves[f"{move}_success"][0] == (
            study.moves[f"{move}_rc"][0, 1] == 0
        )
        assert summary[move]["n"] == 1
    (vmap,) = summary["vulnerability_maps"]
    assert (vmap["fooling_positions"]["successes"], vmap["fooling_positions"]["n"]) == (
        4,
        16,
    )
    assert vmap["success_at_attack_position"] and vmap["index"] == 0
    np.testing.assert_array_equal(study.maps["success"][0][:, 0], True)
    assert study.controls is not None and study.controls["generation0_successes"] == 1
    md = locality_study.table1_markdown({"tiny": study})
    assert "| original one-pixel attack (over all samples) | 33.3% (1/3" in md
    assert "| 1 | 40.0% (2/5" in md and "| 3 | 0.0% (0/4" in md


def tiny_moves(max_distance, permutation=None):
    """(table, moves as locality.csv holds them, images, labels, the study's
    arrays) of the tiny case, without maps (network-space moves too with a pixel
    `permutation`)."""
    images, labels, attack = tiny_case()
    table = locality_study.attack_table(
        np.arange(3), labels, np.array([0, 0, 0]), np.array([0.9, 0.9, 0.9]), attack
    )
    _, moves, _ = locality_study.study_attacks(
        column_model,
        jnp.float32(1.0),
        table,
        images,
        labels,
        seed=0,
        max_distance=max_distance,
        num_maps=0,
        batch_size=16,
        permutation=permutation,
    )
    moved = locality_study.moves_table(table, moves, max_distance)
    return table, moved, images, labels, moves


def test_moves_table_is_what_locality_csv_holds():
    """The in-memory moves equal locality.csv's columns, ring counts per distance."""
    table, moved, *_ = tiny_moves(2)
    assert set(locality_study.MOVE_COLUMNS) <= set(moved)
    np.testing.assert_array_equal(moved["ring_n"], [[5, 6]])
    np.testing.assert_array_equal(moved["ring_success"], [[2, 1]])
    assert moved["index"].tolist() == [0] and moved["r"].tolist() == [255]
    empty = locality_study.moves_table({**table, "success": np.zeros(3, bool)}, {}, 2)
    assert empty["ring_n"].shape == (0, 2) and empty["index"].dtype == np.int64


def test_a_model_that_does_not_reproduce_the_moves_is_refused():
    table, moved, images, labels, _ = tiny_moves(1)
    moved["nearby_success"] = 1 - moved["nearby_success"]
    with pytest.raises(locality_study.OutcomesMismatch, match="not this model's"):
        locality_study.within_image_study(
            column_model, jnp.float32(1.0), table, moved, images, labels, 0, 1, 16
        )


@pytest.mark.parametrize("permutation", [None, tuple(range(H * W))[::-1]])
def test_moves_table_equals_locality_csv_read_back(tmp_path, permutation):
    """The in-memory moves (what the locality experiment's steps pass on, and the
    one call uses) are what the experiment writes and a rerun reads back, with a
    pixel-permuted model's network-space moves too."""
    from propmaps_jax.results import locality_csv

    table, moved, _, _, study = tiny_moves(3, permutation)
    path = tmp_path / "locality.csv"
    path.write_text(locality_csv.text(table, np.flatnonzero(table["success"]), study))
    network = permutation is not None
    read = locality_csv.read(str(path), max_distance=3, network=network)
    assert set(read) == set(moved) and ("netring_n" in read) == network
    for column, values in read.items():
        np.testing.assert_array_equal(moved[column], values, err_msg=column)
        assert moved[column].dtype == values.dtype, column
