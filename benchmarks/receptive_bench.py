"""Full forward of one-pixel candidates vs the windowed forward (`receptive`).

python benchmarks/receptive_bench.py [--models=lenet,resnet] [--slots=1,4]
    [--population=400] [--densify_fractions=1.0,0.7] [--rounds=5] [--seconds=1]

For each bundled model and each batch shape (S slots x P candidates, the attack
engine's shapes): images per second of the engine's plain forward
(`apply_fn(variables, attack_de.perturbed_batch(images, pixels))`, jitted) and of
`receptive.make_candidate_forward` (jitted), the model alone on the built batch
(the plain forward less building the candidates), the largest difference of their
logits, and the multiply-adds (convolutions and dense layers) per candidate of
each. The two are timed in alternating rounds and each reports its best round,
which makes the ratio robust to a machine shared with other work. Compilation
is excluded.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from propmaps_jax import attack_de, checkpoint, models, receptive  # noqa: E402

flags.DEFINE_list("models", ["lenet", "resnet"], "Bundled models (registry names).")
flags.DEFINE_list("slots", ["1", "4"], "Images per forward (S).")
flags.DEFINE_integer("population", 400, "Candidates per image (P).")
flags.DEFINE_list(
    "densify_fractions",
    ["1.0", "0.7"],
    "Window fractions of a map from which the candidate forward goes whole.",
)
flags.DEFINE_integer("rounds", 5, "Alternating timing rounds; the best is reported.")
flags.DEFINE_float("seconds", 1.0, "Approximate seconds per round and forward.")
FLAGS = flags.FLAGS


def batch(slots: int, population: int, seed: int = 0):
    """Random uint8 images (S, 32, 32, 3) and one-pixel candidates (S, P, 1, 5)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (slots, 32, 32, 3), dtype=np.uint8)
    positions = rng.integers(0, 32, (slots, population, 1, 2))
    colours = rng.integers(0, 256, (slots, population, 1, 3))
    return images, np.concatenate([positions, colours], -1).astype(np.int32)


def best_rates(forwards: dict, args: tuple, candidates: int) -> dict[str, float]:
    """Candidates per second of each forward: best of alternating rounds."""
    repeats = {}
    for name, fn in forwards.items():
        fn(*args).block_until_ready()  # compile
        start = time.perf_counter()
        fn(*args).block_until_ready()
        repeats[name] = max(1, round(FLAGS.seconds / (time.perf_counter() - start)))
    best = dict.fromkeys(forwards, 0.0)
    for _ in range(FLAGS.rounds):
        for name, fn in forwards.items():
            start = time.perf_counter()
            for _ in range(repeats[name]):
                out = fn(*args)
            out.block_until_ready()
            rate = candidates * repeats[name] / (time.perf_counter() - start)
            best[name] = max(best[name], rate)
    return best


def main(argv):
    del argv
    print(
        f"jax {jax.__version__}, backend {jax.default_backend()}, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}"
    )
    header = (
        "| model | S x P | forward | densify at | images/s | speed-up "
        "| MACs/candidate | max abs diff |"
    )
    print(header)
    print("|" + " --- |" * (header.count("|") - 1))
    for name in FLAGS.models:
        config, variables, _ = checkpoint.load_weights(name)
        module = models.create_model(config)
        apply_fn = models.make_apply_fn(module)
        full = jax.jit(
            lambda v, i, p, apply_fn=apply_fn: apply_fn(
                v, attack_de.perturbed_batch(i, p)
            )
        )
        model = jax.jit(apply_fn)
        windowed = {
            float(f): receptive.make_candidate_forward(module, 1, float(f))
            for f in FLAGS.densify_fractions
        }
        macs = {f: fwd.multiply_adds(variables) for f, fwd in windowed.items()}
        full_macs = next(iter(macs.values()))["full"]
        for slots in (int(s) for s in FLAGS.slots):
            images, pixels = batch(slots, FLAGS.population)
            args = (variables, images, pixels)
            built = attack_de.perturbed_batch(images, pixels)
            forwards = {
                "full": full,
                "model": lambda v, i, p, b=built, m=model: m(v, b),
            } | {f: jax.jit(w) for f, w in windowed.items()}
            reference = np.asarray(full(*args))
            diffs = {
                f: float(np.max(np.abs(np.asarray(forwards[f](*args)) - reference)))
                for f in windowed
            }
            rates = best_rates(forwards, args, slots * FLAGS.population)
            shape = f"{slots} x {FLAGS.population}"
            print(
                f"| {name} | {shape} | full | - | {rates['full']:,.0f} | 1.00 "
                f"| {full_macs:,} | - |"
            )
            print(
                f"| {name} | {shape} | model alone | - | {rates['model']:,.0f} "
                f"| {rates['model'] / rates['full']:.2f} | {full_macs:,} | - |"
            )
            for f in windowed:
                print(
                    f"| {name} | {shape} | windowed | {f:g} | {rates[f]:,.0f} "
                    f"| {rates[f] / rates['full']:.2f} "
                    f"| {macs[f]['candidate']:,} "
                    f"({full_macs / macs[f]['candidate']:.2f}x fewer) "
                    f"| {diffs[f]:.1e} |"
                )


if __name__ == "__main__":
    app.run(main)
