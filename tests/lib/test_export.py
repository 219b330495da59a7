"""Every jitted program of the experiments lowers for TPU and GPU (jax.export).

No accelerator is needed: `jax.export` lowers to StableHLO for the platforms
asked. The catalog of programs is benchmarks/export_bench.py's `programs` (LeNet
and ResNet-32 at the accelerator's default slots there); here the tiny models,
2 slots of 8 candidates, batches of 2, in one export for both platforms (every
program for LeNet, those that depend on the layers for the ResNet).
"""

import jax
import jax.numpy as jnp
import pytest

from benchmarks import export_bench
from propmaps_jax import backend

# ResNet: the programs whose lowering depends on the model's layers (its forward
# plain and windowed, its BatchNorm in training); the others wrap the same forward.
RESNET_PROGRAMS = ("attack engine (", "training.train_step")


@pytest.mark.parametrize("model_name", ["lenet_tiny", "resnet_tiny"])
def test_every_program_lowers_for_tpu_and_cuda(model_name):
    # One module serves both platforms only if their backend choices agree.
    for name in backend.CHOICES:
        assert backend.enabled(name, "tpu") == backend.enabled(name, "cuda")
    programs = export_bench.programs(
        model_name,
        "tpu",
        slots=2,
        population=8,
        queue_len=4,
        batch=2,
        saliency_samples=2,
        saliency_steps=2,
    )
    names = [p.name for p in programs]
    for expected in (
        "attack engine (plain forward",
        "attack engine (receptive forward",
        "attack_image",
        "propagation.analyze",
        "propagation.accumulate_statistics",
        "locality evaluator",
        "locality.vulnerability_map",
        "saliency.saliency_map (smoothgrad)",
        "salience analyse_changes",
        "training.train_step",
    ):
        assert any(n.startswith(expected) for n in names), expected
    if model_name == "resnet_tiny":
        programs = [p for p in programs if p.name.startswith(RESNET_PROGRAMS)]
    for program in programs:
        lowered = export_bench.export(program, ("tpu", "cuda"))
        assert lowered.platforms == ("tpu", "cuda")
        assert lowered.bytecode_bytes > 0 and lowered.operations > 10, program.name
        assert not export_bench.foreign_custom_calls(lowered), (
            program.name,
            lowered.custom_calls,
        )
        assert lowered.float64_values == 0, program.name


def test_a_cpu_only_custom_call_is_caught():
    # The check above can fail: a LAPACK decomposition lowered for CPU is a custom
    # call that no TPU implements.
    program = export_bench.Program(
        "eigh", jax.jit(jnp.linalg.eigh), (jax.ShapeDtypeStruct((3, 3), jnp.float32),)
    )
    lowered = export_bench.export(program, ("cpu",))
    assert export_bench.foreign_custom_calls(lowered)
    # And so can the float64 check.
    with jax.enable_x64(True):
        program = export_bench.Program(
            "f64", jax.jit(lambda x: x * 2), (jax.ShapeDtypeStruct((3,), jnp.float64),)
        )
        assert export_bench.export(program, ("tpu",)).float64_values > 0
