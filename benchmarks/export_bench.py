"""Lower every jitted program of the experiments for TPU and GPU, on this machine.

    python benchmarks/export_bench.py                     # LeNet and ResNet-32
    python benchmarks/export_bench.py --models=lenet_tiny --slots=2 --population=8

`jax.export` traces each program with abstract arguments (shapes and dtypes, no
data, no weights) and lowers it to StableHLO for the platforms asked ("tpu" and
"cuda"), with the backend choices of that platform (`backend.CHOICES`: on TPU and
GPU no column-pair convolution, no bucketed forward; the receptive forward is
exported too, as a user may ask for it). It needs no accelerator: what it shows is
that the programs lower (no host callback, no CPU-only custom call, no float64
value), and how large they are. It does not compile them with XLA's TPU or GPU
compiler, so a compile-time failure or an out-of-memory there is not ruled out.

It prints one row per program and platform: StableHLO bytecode bytes, operations,
and custom calls; then the attack's estimated memory (`memory.attack_memory`)
beside XLA's CPU memory analysis of the same program. The programs are the ones
the experiments jit (`programs`); tests/test_export.py runs them for tiny models.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

from propmaps_jax import attack, backend, memory, models, training  # noqa: E402
from propmaps_jax.analysis import locality, propagation, saliency  # noqa: E402
from propmaps_jax.attack import engine as attack_engine  # noqa: E402
from propmaps_jax.attack.de import AttackConfig, attack_image  # noqa: E402
from propmaps_jax.models import receptive  # noqa: E402

PLATFORMS = ("tpu", "cuda")
# Custom calls that the partitioner (shard_map) or a platform's own lowering emits
# and that every backend implements.
ALLOWED_CUSTOM_CALLS = frozenset(
    {"Sharding", "SPMDFullToShardShape", "SPMDShardToFullShape"}
)


@dataclasses.dataclass(frozen=True)
class Program:
    """A jitted program of the experiments and abstract arguments to lower it."""

    name: str
    fn: Callable[..., Any]  # jitted
    args: tuple[Any, ...]  # jax.ShapeDtypeStruct pytrees


def _spec(tree: Any) -> Any:
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree
    )


def _abstract_variables(module, image_shape) -> Any:
    dummy = jnp.zeros((1, *image_shape), jnp.float32)
    return jax.eval_shape(lambda: module.init(jax.random.key(0), dummy, train=False))


def _images(batch: int, image_shape, dtype=jnp.uint8) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct((batch, *image_shape), dtype)


def _ints(*shape: int) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, jnp.int32)


def engine_programs(
    module,
    variables,
    platform: str,
    slots: int,
    population: int,
    queue_len: int,
    mesh: Mesh,
    image_shape=(32, 32, 3),
    compare_buckets: bool = False,
) -> list[Program]:
    """The attack engine's run program (plain and receptive candidate forward) and
    its init program, with `platform`'s backend choices, at `slots` per device;
    `compare_buckets`: also the plain one with the other bucket choice."""
    apply_fn = models.make_apply_fn(module)
    config = AttackConfig(population=population)
    impl = str(jax.random.key_impl(jax.random.key(0)))
    devices = mesh.devices.size
    key_data = jax.ShapeDtypeStruct(
        jax.random.key_data(jax.random.key(0)).shape, jnp.uint32
    )
    queue = (
        _images(devices, (queue_len, *image_shape)),
        _ints(devices, queue_len),
        _ints(devices, queue_len),
        _ints(devices, queue_len),
    )
    counts = _ints(devices)
    buckets = backend.enabled("active_buckets", platform)
    out = []
    forwards = {"plain": None, "receptive": receptive.make_candidate_forward(module, 1)}
    variants = [(label, forward, buckets) for label, forward in forwards.items()]
    if compare_buckets:
        variants.append(
            (f"plain, {'not ' if buckets else ''}bucketed", None, not buckets)
        )
    for label, forward, bucketed in variants:
        run, init = attack_engine.build_programs(
            apply_fn, None, config, slots, queue_len, mesh, impl, forward, bucketed
        )
        state = jax.eval_shape(init, counts)
        out.append(
            Program(
                f"attack engine ({label} forward, {slots} slots x {population})",
                run,
                (key_data, variables, queue, counts, counts, _ints(), state),
            )
        )
    out.append(Program("attack engine init", init, (counts,)))
    return out


def programs(
    model_name: str,
    platform: str,
    *,
    slots: int,
    population: int,
    queue_len: int,
    batch: int,
    mesh: Mesh | None = None,
    saliency_samples: int = 16,
    saliency_steps: int = 32,
    compare_buckets: bool = False,
) -> list[Program]:
    """Every jitted program the experiments run, for `model_name` on `platform`.

    `slots`, `population`, `queue_len`: the attack engine's; `batch`: the batch of
    the other programs (evaluation, locality, saliency, training).
    """
    image_shape = (32, 32, 3)
    module = models.for_platform(models.create_model(model_name), platform)
    features = models.linen_features(module)  # the maps' model: every conv output
    variables = _abstract_variables(module, image_shape)
    apply_fn = models.make_apply_fn(module)
    mesh = Mesh(np.asarray(jax.devices()[:1]), (attack.AXIS,)) if mesh is None else mesh
    out = engine_programs(
        module,
        variables,
        platform,
        slots,
        population,
        queue_len,
        mesh,
        image_shape,
        compare_buckets,
    )

    key_data = jax.ShapeDtypeStruct(
        jax.random.key_data(jax.random.key(0)).shape, jnp.uint32
    )
    config = AttackConfig(population=population)

    def one_image(kd, v, image, label):
        key = jax.random.wrap_key_data(kd)
        return attack_image(key, apply_fn, v, image, label, config)

    out.append(
        Program(
            f"attack_image (one image, population {population})",
            jax.jit(one_image),
            (
                key_data,
                variables,
                jax.ShapeDtypeStruct(image_shape, jnp.uint8),
                _ints(),
            ),
        )
    )
    out.append(
        Program(
            "evaluation.predict (softmax)",
            jax.jit(lambda v, x: jax.nn.softmax(apply_fn(v, x.astype(jnp.float32)))),
            (variables, _images(batch, image_shape)),
        )
    )
    # Propagation maps of one attack (`paper_examples.attack_maps`).
    out.append(
        Program(
            "propagation.analyze (one attack)",
            jax.jit(
                lambda v, x, xa: propagation.analyze(features, v, x, xa, signed=False)
            ),
            (
                variables,
                _images(1, image_shape, jnp.float32),
                _images(1, image_shape, jnp.float32),
            ),
        )
    )
    # Propagation statistics over many attacks (`statistics.study_attacks`).
    shapes = models.check_model(features, variables, image_shape)
    stats = _spec(jax.eval_shape(lambda: propagation.init_statistics(shapes)))

    def statistics_step(state, v, x, x_adv, success, valid):
        return propagation.accumulate_statistics(
            state, features, v, x, x_adv, success, valid, False
        )

    out.append(
        Program(
            "propagation.accumulate_statistics",
            jax.jit(statistics_step, donate_argnums=0),
            (
                stats,
                variables,
                _images(batch, image_shape, jnp.float32),
                _images(batch, image_shape, jnp.float32),
                jax.ShapeDtypeStruct((batch,), bool),
                jax.ShapeDtypeStruct((batch,), bool),
            ),
        )
    )
    # The locality evaluator and the vulnerability map (as experiments/locality.py).
    pixels = _ints(batch, 1, 5)
    evaluate = locality.moves_program(apply_fn, 4)
    out.append(
        Program(
            "locality evaluator (nearby, random, rings 1-4)",
            evaluate,
            (
                variables,
                _images(batch, image_shape),
                _ints(batch),
                pixels,
                _ints(batch, 2),
                _ints(batch, 2),
            ),
        )
    )
    out.append(
        Program(
            "locality.vulnerability_map (one image)",
            locality.vulnerability_program(apply_fn, 256),
            (
                variables,
                jax.ShapeDtypeStruct(image_shape, jnp.uint8),
                _ints(),
                _ints(3),
            ),
        )
    )
    # Saliency maps, one program per method, and the salience study's program.
    for method in saliency.METHODS:
        sconfig = saliency.SaliencyConfig(
            method=method, samples=saliency_samples, steps=saliency_steps
        )

        def saliency_program(kd, v, x, classes, sconfig=sconfig):
            key = jax.random.wrap_key_data(kd) if sconfig.uses_key else None
            return saliency.saliency_map(key, apply_fn, v, x, classes, sconfig)

        out.append(
            Program(
                f"saliency.saliency_map ({method})",
                jax.jit(saliency_program),
                (key_data, variables, _images(batch, image_shape), _ints(batch)),
            )
        )
    sconfig = saliency.SaliencyConfig(method="smoothgrad", samples=saliency_samples)
    analyse = jax.jit(
        functools.partial(saliency.analyse_changes, sconfig, features, list(shapes)[-1])
    )
    keys = jax.ShapeDtypeStruct((batch,), jax.random.key(0).dtype)
    out.append(
        Program(
            "salience analyse_changes (smoothgrad)",
            analyse,
            (
                variables,
                _images(batch, image_shape),
                _ints(batch),
                _ints(batch, 3, 5),
                keys,
            ),
        )
    )
    # Training (experiments/train.py): the step (donated state), evaluation.
    optimizer = training.make_optimizer(0.01, 5e-4, 1000, 10)
    state = jax.eval_shape(
        lambda v: training.state_from_variables(v, optimizer), variables
    )
    train_module = models.for_platform(models.create_model(model_name), platform)
    out.append(
        Program(
            "training.train_step (augmented)",
            jax.jit(
                functools.partial(
                    training.train_step, train_module, optimizer, do_augment=True
                ),
                donate_argnums=(0,),
            ),
            (
                state,
                _images(batch, image_shape),
                _ints(batch),
                _ints(batch),
                jax.ShapeDtypeStruct((), keys.dtype),
            ),
        )
    )
    out.append(
        Program(
            "training.eval_step",
            jax.jit(functools.partial(training.eval_step, module)),
            (variables, _images(batch, image_shape), _ints(batch)),
        )
    )
    return out


@dataclasses.dataclass(frozen=True)
class Lowered:
    """What one export gave: the program, its platforms, size and custom calls."""

    name: str
    platforms: tuple[str, ...]
    bytecode_bytes: int
    text_bytes: int
    operations: int
    custom_calls: tuple[str, ...]
    float64_values: int  # f64 types in the module (slow or absent on accelerators)
    seconds: float


_OP = re.compile(r"^\s*(?:%[\w#:, ]+=\s*)?\"?([a-z_]+\.[a-z_.]+)", re.MULTILINE)
_CUSTOM = re.compile(r"custom_call\s*@([\w.]+)|call_target_name\s*=\s*\"([\w.]+)\"")


def export(program: Program, platforms: Sequence[str]) -> Lowered:
    """`jax.export` of a program for `platforms`; raises if it does not lower."""
    tick = time.perf_counter()
    exported = jax.export.export(program.fn, platforms=tuple(platforms))(*program.args)
    text = exported.mlir_module()
    calls = sorted({a or b for a, b in _CUSTOM.findall(text)})
    return Lowered(
        program.name,
        tuple(exported.platforms),
        len(exported.mlir_module_serialized),
        len(text),
        len(_OP.findall(text)),
        tuple(calls),
        len(re.findall(r"\bf64\b", text)),
        time.perf_counter() - tick,
    )


def foreign_custom_calls(lowered: Lowered) -> list[str]:
    """Custom calls that not every backend implements (none expected)."""
    return [c for c in lowered.custom_calls if c not in ALLOWED_CUSTOM_CALLS]


def memory_rows(model_name: str, slots: int, population: int, queue_len: int):
    """(estimate, XLA CPU memory analysis) of the engine with accelerator choices."""
    module = models.for_platform(models.create_model(model_name), "tpu")
    variables = _abstract_variables(module, (32, 32, 3))
    estimate = memory.attack_memory(
        models.make_apply_fn(module), variables, slots, population, queue_len
    )
    mesh = Mesh(np.asarray(jax.devices()[:1]), (attack.AXIS,))
    run = engine_programs(module, variables, "tpu", slots, population, queue_len, mesh)[
        0
    ]
    tick = time.perf_counter()
    compiled = run.fn.lower(*run.args).compile()
    return estimate, compiled.memory_analysis(), time.perf_counter() - tick


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="lenet,resnet")
    parser.add_argument("--platforms", default=",".join(PLATFORMS))
    parser.add_argument("--population", type=int, default=400)
    parser.add_argument(
        "--slots",
        type=int,
        default=None,
        help="slots per device (default: an accelerator's, 32768 / population)",
    )
    parser.add_argument("--queue_len", type=int, default=10000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument(
        "--memory", action="store_true", help="also compile on CPU for its analysis"
    )
    parser.add_argument(
        "--programs", default="", help="only programs whose name starts with this"
    )
    parser.add_argument(
        "--devices",
        type=int,
        default=1,
        help="devices of the engine's mesh (faked CPU devices; e.g. 4: a TPU host)",
    )
    args = parser.parse_args(argv)
    if jax.device_count() < args.devices:  # fake CPU devices: restart with the flag
        env = dict(os.environ)
        env["XLA_FLAGS"] = (
            env.get("XLA_FLAGS", "")
            + f" --xla_force_host_platform_device_count={args.devices}"
        )
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    mesh = Mesh(np.asarray(jax.devices()[: args.devices]), (attack.AXIS,))
    slots = args.slots or attack.default_slots(args.population, 10**9, 1, "tpu")
    platforms = args.platforms.split(",")
    print(
        f"jax {jax.__version__}, lowered on {jax.devices()[0].device_kind} "
        f"({os.cpu_count()} cores); engine at {slots} slots x {args.population} "
        f"per device, {args.devices} device(s)"
    )
    print("| model | program | platform | StableHLO bytes | ops | custom calls | s |")
    print("| --- | --- | --- | ---: | ---: | --- | ---: |")
    failed = []
    for name in args.models.split(","):
        for platform in platforms:
            for program in programs(
                name,
                platform,
                slots=slots,
                population=args.population,
                queue_len=args.queue_len,
                batch=args.batch,
                mesh=mesh,
                compare_buckets=True,
            ):
                if not program.name.startswith(args.programs):
                    continue
                try:
                    low = export(program, (platform,))
                except Exception as e:  # noqa: BLE001 - reported, then exit 1
                    failed.append(f"{name} {program.name} {platform}: {e}")
                    print(f"| {name} | {program.name} | {platform} | FAILED | | | |")
                    continue
                calls = ", ".join(low.custom_calls) or "none"
                if foreign_custom_calls(low) or low.float64_values:
                    failed.append(
                        f"{name} {program.name} {platform}: custom calls {calls}, "
                        f"{low.float64_values} f64 values"
                    )
                print(
                    f"| {name} | {program.name} | {platform} | "
                    f"{low.bytecode_bytes:,} | {low.operations:,} | {calls} | "
                    f"{low.seconds:.1f} |",
                    flush=True,
                )
    if args.memory:
        print("\n| model | candidates | estimate GiB | XLA CPU GiB | compile s |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for name in args.models.split(","):
            est, ma, seconds = memory_rows(name, slots, args.population, args.queue_len)
            xla = ma.temp_size_in_bytes + ma.argument_size_in_bytes
            print(
                f"| {name} | {est.candidates:,} | {est.total / 2**30:.2f} | "
                f"{xla / 2**30:.2f} (temp {ma.temp_size_in_bytes / 2**30:.2f}) | "
                f"{seconds:.0f} |",
                flush=True,
            )
    if failed:
        print("\n".join(["did not lower:", *failed]), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
