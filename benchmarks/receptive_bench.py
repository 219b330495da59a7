"""Full forward of one-pixel candidates vs the windowed forward (`receptive`).

python benchmarks/receptive_bench.py [--models=lenet,resnet] [--slots=1,4]
    [--population=400] [--densify_fractions=1.0,0.7] [--rounds=5] [--seconds=1]

For each bundled model and each batch shape (S slots x P candidates, the attack
engine's shapes): images per second of the engine's plain forward
(`apply_fn(variables, attack_de.perturbed_batch(images, pixels))`, jitted) and of
`receptive.make_candidate_forward` (jitted), the model alone on the built batch
(the plain forward less building the candidates), the largest difference of their
logits, and the multiply-adds (convolutions and dense layers) per candidate of
each (the windowed forward's include 1/P of its clean pass). The forwards are
timed in alternating rounds; each reports its best round in wall time and in CPU
time (all threads; steadier on a machine shared with other work). Compilation is
excluded.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from propmaps_jax import models  # noqa: E402
from propmaps_jax.attack import de as attack_de
from propmaps_jax.models import (
    checkpoint,
    receptive,  # noqa: E402
)

flags.DEFINE_list("models", ["lenet", "resnet"], "Bundled models (registry names).")
flags.DEFINE_list("slots", ["1", "4"], "Images per forward (S).")
flags.DEFINE_integer("population", 400, "Candidates per image (P).")
flags.DEFINE_list(
    "densify_fractions",
    ["0.7", "1.0"],
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


def best_rates(forwards: dict, args: tuple, candidates: int) -> dict:
    """{name: (candidates per second, per CPU-second)} of each forward, each the
    best of alternating rounds. CPU time (all threads) counts the work done and
    varies less than wall time on a machine shared with other work."""
    repeats = {}
    for name, fn in forwards.items():
        fn(*args).block_until_ready()  # compile
        start = time.perf_counter()
        fn(*args).block_until_ready()
        repeats[name] = max(1, round(FLAGS.seconds / (time.perf_counter() - start)))
    best = {name: (0.0, 0.0) for name in forwards}
    for _ in range(FLAGS.rounds):
        for name, fn in forwards.items():
            wall, cpu = time.perf_counter(), time.process_time()
            for _ in range(repeats[name]):
                out = fn(*args)
            out.block_until_ready()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            count = candidates * repeats[name]
            best[name] = (
                max(best[name][0], count / wall),
                max(best[name][1], count / max(cpu, 1e-9)),
            )
    return best


def main(argv):
    del argv
    print(
        f"jax {jax.__version__}, backend {jax.default_backend()}, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}"
    )
    header = (
        "| model | S x P | forward | densify at | images/s | speed-up "
        "| images/CPU-s | speed-up | MACs/candidate | max abs diff |"
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
        # The clean images' pass (one full forward per image) shared by P.
        per_candidate = {
            f: m["candidate"] + full_macs / FLAGS.population for f, m in macs.items()
        }
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

            def speeds(key, rates=rates):
                (wall, cpu), (wall_full, cpu_full) = rates[key], rates["full"]
                return (
                    f"{wall:,.0f} | {wall / wall_full:.2f} "
                    f"| {cpu:,.0f} | {cpu / cpu_full:.2f}"
                )

            print(
                f"| {name} | {shape} | full | - | {speeds('full')} "
                f"| {full_macs:,} | - |"
            )
            print(
                f"| {name} | {shape} | model alone | - | {speeds('model')} "
                f"| {full_macs:,} | - |"
            )
            for f in windowed:
                print(
                    f"| {name} | {shape} | windowed | {f:g} | {speeds(f)} "
                    f"| {per_candidate[f]:,.0f} "
                    f"({full_macs / per_candidate[f]:.2f}x fewer) "
                    f"| {diffs[f]:.1e} |"
                )


if __name__ == "__main__":
    app.run(main)
