"""One attack's propagation maps as the paper's figures 2-6 show them, and which
attacks those figures show, chosen by rule from an attack table.

`attack_maps` gives the maps of one perturbation of one image with what a figure
and its saved arrays need (`AttackMaps`: the perturbed image, the predictions, the
per-layer maps and summaries, `arrays()` for an .npz). `paper_figures` chooses
the attacks of figures 2-6 and maps each (`PaperFigure`, with the record that
figures.json keeps); `propmaps_jax.figures.propagation` draws them.

`claims.figure_examples` holds the rules over an attack table's columns (median
p(true) for figure 2, the largest last-layer max|dFM| / max FM for figures 5 and
6) and `claims.moved_by_one` figure 4's move; here are the model computations
they need (the last-layer ratio of the failed attacks, p(true) at each
neighbour), so that one call gives the attacks of the figures. Kept apart from
claims.py, whose git date is the date of the verdict rules.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from propmaps_jax.analysis import propagation
from propmaps_jax.analysis.claims import figure_examples, moved_by_one, neighbours
from propmaps_jax.attack.perturb import apply_pixels, apply_pixels_batch
from propmaps_jax.models import CIFAR10_CLASSES, logits_of
from propmaps_jax.types import ApplyFn, FeaturesFn, Variables


def neighbour_prob_true(
    apply_fn: ApplyFn,
    variables: Variables,
    image: np.ndarray,
    label: int,
    pixel: np.ndarray,
) -> dict[tuple[int, int], float]:
    """{neighbour position: p(label)} of the clean `image` with the colour of the
    one-pixel perturbation `pixel` (1, 5) put at each neighbour (Chebyshev
    distance 1) of its position: `moved_by_one`'s input (figure 4)."""
    height, width = image.shape[:2]
    moves = neighbours(int(pixel[0, 0]), int(pixel[0, 1]), height, width)
    candidates = np.repeat(pixel[None], len(moves), axis=0)
    candidates[:, 0, :2] = moves
    batch = np.broadcast_to(image, (candidates.shape[0], *image.shape))
    logits = jax.jit(apply_fn)(
        variables,
        apply_pixels_batch(jnp.asarray(batch, jnp.float32), jnp.asarray(candidates)),
    )
    p_true = np.asarray(jax.nn.softmax(logits)[:, label], np.float64)
    return dict(zip(moves, p_true, strict=True))


def paper_figure_examples(
    features_fn: FeaturesFn,
    variables: Variables,
    images: np.ndarray,
    labels: np.ndarray,
    table: dict[str, np.ndarray],
) -> list[tuple[str, int, np.ndarray, str]]:
    """The attacks of the paper's figures 2-6, chosen by rule from an attack table
    on the clean test `images`/`labels`: (figure, table row, pixels (k, 5), rule),
    ordered by figure ("2" and "3" are one attack; "4" is figure 2's colour moved
    by `moved_by_one`). Empty when nothing was attacked. The ratios are of
    `features_fn`'s layers (the paper's: `models.linen_features(module)`)."""
    failed = np.flatnonzero(table["attacked"] & ~table["success"])
    ratio = np.full(table["index"].shape, np.nan)
    ratio[failed] = propagation.last_layer_max_ratio(
        features_fn,
        variables,
        images[table["index"][failed]],
        table["pixels"][failed],
    )
    examples = []
    for figure, pick in figure_examples(table, ratio).items():
        row = pick["row"]
        examples.append((figure, row, table["pixels"][row], pick["rule"]))
        if figure == "2":
            index, pixel = int(table["index"][row]), table["pixels"][row]
            to = moved_by_one(
                neighbour_prob_true(
                    logits_of(features_fn),
                    variables,
                    images[index],
                    int(labels[index]),
                    pixel,
                )
            )
            moved = pixel.copy()
            moved[0, :2] = to
            examples.append(
                (
                    "4",
                    row,
                    moved,
                    "figure 2's colour moved to the neighbouring position (Chebyshev "
                    "distance 1) where p(true) stays highest",
                )
            )
    return sorted(examples, key=lambda e: e[0])


def class_name(index: int, num_classes: int) -> str:
    """CIFAR-10 name of a class (its number for other class counts)."""
    return CIFAR10_CLASSES[index] if num_classes == len(CIFAR10_CLASSES) else str(index)


@dataclasses.dataclass(frozen=True)
class AttackMaps:
    """The propagation maps of one perturbation of one image (figures 2-6).

    `result` is `propagation.maps_of_result` of this one image: "order" {layer:
    (H, W, K)}, "probs" and "probs_adv" (classes,), "pm" {"max", "avg": {layer:
    (H, W)}}, "summaries" {name: (layers,)}.
    """

    index: int
    label: int
    image: np.ndarray
    perturbed: np.ndarray
    pixels: np.ndarray
    result: dict[str, Any]
    signed: bool = False
    # The layers' kind (`models.LAYER_KINDS`), for captions; "layers" for a model
    # that is not the linen adapter of a kind.
    layers: str = "conv"

    @property
    def num_classes(self) -> int:
        """The model's number of classes."""
        return len(self.result["probs"])

    @property
    def pixels_text(self) -> str:
        """'(12, 30) -> RGB (255, 0, 0)' per changed pixel, joined by '; '."""
        return "; ".join(
            f"({r}, {c}) -> RGB ({cr}, {cg}, {cb})" for r, c, cr, cg, cb in self.pixels
        )

    def summary(self) -> str:
        """Lines of text: the predictions before and after, the perturbation, and
        per layer its shape, max|dFM| / max FM and the spread of the map."""
        probs, probs_adv = self.result["probs"], self.result["probs_adv"]
        before, after = int(np.argmax(probs)), int(np.argmax(probs_adv))
        name = functools.partial(class_name, num_classes=self.num_classes)
        lines = [
            f"test image {self.index}: {name(before)} {probs[before]:.1%} -> "
            f"{name(after)} {probs_adv[after]:.1%} (true {name(self.label)}), "
            f"perturbation {self.pixels_text}",
            f"{'layer':<28} {'HxWxK':>9} {'max|dFM|/maxFM':>15} {'spread>10%':>11}",
        ]
        order, summaries = self.result["order"], self.result["summaries"]
        for i, n in enumerate(order):
            lines.append(
                f"{n:<28} {'x'.join(map(str, order[n])):>9} "
                f"{summaries['max_ratio'][i]:>15.3f} {summaries['spread'][i]:>11.1%}"
            )
        return "\n".join(lines)

    def arrays(self) -> dict[str, np.ndarray]:
        """What an .npz of these maps holds (the propagation experiment's
        <name>_maps.npz): layers, shapes, images, pixels, predictions, the
        summaries and "pm_max/<layer>", "pm_avg/<layer>"."""
        result = self.result
        order = result["order"]
        arrays: dict[str, np.ndarray] = {
            "layers": np.array(list(order)),
            "shapes": np.array([order[n] for n in order], np.int64),
            "image": self.image,
            "perturbed": self.perturbed,
            "pixels": self.pixels,
            "label": np.array(self.label),
            "index": np.array(self.index),
            "probs": result["probs"],
            "probs_adv": result["probs_adv"],
            "signed": np.array(self.signed),
        }
        arrays.update(result["summaries"])
        for reduce in ("max", "avg"):
            arrays.update({f"pm_{reduce}/{n}": result["pm"][reduce][n] for n in order})
        return arrays


def attack_maps(
    features_fn: FeaturesFn,
    variables: Variables,
    image: np.ndarray,
    label: int,
    pixels: np.ndarray,
    index: int,
    signed: bool = False,
) -> AttackMaps:
    """The maps of the perturbation `pixels` (k, 5) on the clean `image` (H, W, C,
    0..255) of true class `label`, test image `index`, through the layers of
    `features_fn` (`models.contract`); `signed` as in `propagation.maps_of_result`."""
    perturbed = np.asarray(apply_pixels(jnp.asarray(image), jnp.asarray(pixels)))
    maps = propagation.maps_of_result(
        features_fn, variables, image[None], pixels[None], signed
    )
    result = {
        "order": maps["order"],
        "probs": maps["probs"][0],
        "probs_adv": maps["probs_adv"][0],
        "pm": {r: {n: m[0] for n, m in pm.items()} for r, pm in maps["pm"].items()},
        "summaries": {k: v[0] for k, v in maps["summaries"].items()},
    }
    layers = getattr(features_fn, "layers", None)
    layers = layers if isinstance(layers, str) else "layers"
    return AttackMaps(index, label, image, perturbed, pixels, result, signed, layers)


def disagreement(result: dict[str, Any], recorded: dict | None) -> str:
    """'' when `result` ("probs", "probs_adv") predicts what an attack table's row
    `recorded` ("pred_before", "pred_after") records, else how they differ.

    With the run's model and weights a prediction flips only at a near tie (another
    device or precision); the figure then says so instead of contradicting itself.
    """
    if recorded is None:
        return ""
    num_classes = len(result["probs"])
    ours = {
        "pred_before": int(np.argmax(result["probs"])),
        "pred_after": int(np.argmax(result["probs_adv"])),
    }
    differ = [k for k in ours if ours[k] != recorded[k]]
    return "; ".join(
        f"{k}: attack.csv {class_name(recorded[k], num_classes)}, here "
        f"{class_name(ours[k], num_classes)}"
        for k in differ
    )


@dataclasses.dataclass(frozen=True)
class PaperFigure:
    """One of the paper's figures 2-6: `figure` "2" (also figure 3, its PM_avg),
    "4", "5" or "6", the `rule` that chose its attack, where the perturbation
    comes from (`source`) and its maps."""

    figure: str
    rule: str
    source: str
    maps: AttackMaps

    @property
    def name(self) -> str:
        """The files' stem: figure<N>_<test image> (figure2_3_<I> for 2 and 3)."""
        return f"figure{'2_3' if self.figure == '2' else self.figure}_{self.maps.index}"

    def record(self) -> dict[str, Any]:
        """The figure's entry of figures.json: rule, attack, confidences, files."""
        maps, label = self.maps, self.maps.label
        probs, probs_adv = maps.result["probs"], maps.result["probs_adv"]
        summaries = maps.result["summaries"]
        return {
            "figure": "2 and 3" if self.figure == "2" else self.figure,
            "rule": self.rule,
            "index": maps.index,
            "label": label,
            "pixels": maps.pixels_text,
            "pred_before": int(np.argmax(probs)),
            "confidence_before": float(np.max(probs)),
            "prob_true_before": float(probs[label]),
            "pred_after": int(np.argmax(probs_adv)),
            "confidence_after": float(np.max(probs_adv)),
            "prob_true_after": float(probs_adv[label]),
            "last_layer_max_ratio": float(summaries["max_ratio"][-1]),
            "last_layer_spread_strong": float(summaries["spread_strong"][-1]),
            "files": [f"{self.name}_pm_max.png", f"{self.name}_pm_avg.png"],
        }


def paper_figures(
    features_fn: FeaturesFn,
    variables: Variables,
    images: np.ndarray,
    labels: np.ndarray,
    table: dict[str, np.ndarray],
    signed: bool = False,
    *,
    chosen_by: FeaturesFn | None = None,
) -> list[PaperFigure]:
    """The paper's figures 2-6 of an attack table on the clean test `images` /
    `labels`, each attack chosen by `paper_figure_examples` on the maps of
    `chosen_by` (default `features_fn`; the experiment passes the default layers,
    `models.linen_features(module)`, so that every `signed` and layer kind shows the
    same attacks) and mapped by `features_fn` with `signed`; ordered by figure,
    figure 3 drawn with figure 2. Empty when nothing was attacked."""
    figures = []
    for figure, row, pixels, rule in paper_figure_examples(
        chosen_by or features_fn, variables, images, labels, table
    ):
        if figure == "3":
            continue  # drawn with figure 2 (the same attack's PM_avg)
        index, label = int(table["index"][row]), int(table["label"][row])
        maps = attack_maps(
            features_fn, variables, images[index], label, pixels, index, signed
        )
        outcome = "successful" if table["success"][row] else "failed (best candidate)"
        source = f"attack.csv, {outcome}" if figure != "4" else "moved pixel"
        figures.append(PaperFigure(figure, rule, source, maps))
    return figures
