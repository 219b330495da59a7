"""Backend-specific choices, decided in one place.

A few speed tricks were measured on one backend only (this project has only ever
run on CPUs). Each is switched on where it was measured faster and off elsewhere,
by `enabled(name, platform)` reading the table `CHOICES` below; nothing else in
the library tests a backend name. Results do not depend on these choices beyond
float rounding: the engine's results do not depend on its slot count, and the
other tricks compute the same sums (tested on CPU both ways).

Platforms are JAX's device platforms: "cpu", "gpu" (CUDA or ROCm; `jax.export`'s
"cuda" and "rocm" are read as "gpu") and "tpu".
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from propmaps_jax.errors import PropmapsError

__all__ = [
    "CHOICES",
    "Choice",
    "device_memory_limit",
    "enabled",
    "normalize_platform",
    "platform_of",
]


@dataclasses.dataclass(frozen=True)
class Choice:
    """A speed trick: the platforms where it is on, and where that was measured."""

    platforms: tuple[str, ...]
    measured: str


CHOICES: dict[str, Choice] = {
    # attack.default_slots: a CPU device's default batch (512 candidates per step,
    # one image at population 400) instead of an accelerator's 32,768.
    "small_batch": Choice(
        ("cpu",),
        "2-core x86 CPU (2026-11-26): the models' batched forward runs the most "
        "images/s at batches of 100-400 and fewer at 1,600 (BENCHMARKS.md, "
        "forward_bench); the accelerator batch is unmeasured",
    ),
    # models.LeNet's first convolution (3 -> 6 channels) with columns folded in
    # pairs into the channels (`models.ColumnPairConv`); same parameters.
    "column_pair_conv": Choice(
        ("cpu",),
        "2-core x86 CPU, XLA CPU (2026-11-26): LeNet's first convolution (26 of "
        "the 33 ms of a batch of 400, about 5 GMAC/s) 4x faster folded "
        "(BENCHMARKS.md, 'Where the time went'); not measured on GPU or TPU",
    ),
    # The receptive-field candidate forward (`receptive.CandidateForward`) in
    # place of the model's plain forward of the perturbed images.
    "receptive_forward": Choice(
        ("cpu",),
        "2-core x86 CPU, XLA CPU (2026-11-26): 1 x 400 candidates, LeNet about 3x "
        "and ResNet-32 1.3x the plain forward's candidates per second "
        "(BENCHMARKS.md); on an accelerator its gathers are unmeasured",
    ),
    # attack_engine: the forward of only the active slots, gathered into the
    # smallest of the sizes slots, slots/2, ..., 1 (a lax.switch over them).
    "active_buckets": Choice(
        ("cpu",),
        "2-core x86 CPU (2026-11-26): the tail of a run (fewer images than slots) "
        "runs only its active slots, 1-4 branches at a CPU's 1-5 slots; at an "
        "accelerator's 82 slots it is 8 branches, each a full forward compiled "
        "into the program, for the last few steps of a run: unmeasured there",
    ),
}

_ALIASES = {"cuda": "gpu", "rocm": "gpu"}


def normalize_platform(platform: str) -> str:
    """ "cpu", "gpu" or "tpu" from a device platform or a `jax.export` platform."""
    platform = str(platform).lower()
    return _ALIASES.get(platform, platform)


def platform_of(device: Any = None) -> str:
    """The platform of a device (default: JAX's default backend), normalised."""
    if device is None:
        return normalize_platform(jax.default_backend())
    return normalize_platform(device.platform)


def enabled(name: str, platform: str | None = None) -> bool:
    """Whether the choice `name` of CHOICES is on for `platform` (default: the
    default backend)."""
    if name not in CHOICES:
        raise PropmapsError(
            f"unknown backend choice {name!r}; known: {', '.join(CHOICES)}"
        )
    platform = platform_of() if platform is None else normalize_platform(platform)
    return platform in CHOICES[name].platforms


def device_memory_limit(device: Any) -> int | None:
    """Bytes JAX may allocate on `device` (`memory_stats()["bytes_limit"]`), or None
    where JAX does not report it (CPU)."""
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - backends without memory stats raise various
        return None
    if not stats or "bytes_limit" not in stats:
        return None
    limit = int(stats["bytes_limit"])
    return limit if limit > 0 else None
