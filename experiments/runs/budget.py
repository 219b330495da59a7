"""What a run will cost before it starts: memory of a batch, time of the whole job.

- `check_batch`: a user-given --slots/--population whose batch of candidates
  cannot fit in the device's memory is refused with one line before anything is
  compiled. Every term that grows with the population or the slots is counted
  (`slot_bytes`): the activations per candidate (`propmaps_jax.memory`: the peak
  of values live at once in the forward's jaxpr, traced, nothing runs), the DE
  state, and the DE step of each slot, which grows with the square of the
  population; compared with the memory the device has free (on a CPU:
  MemAvailable of /proc/meminfo).
- `calibrate`: seconds per DE generation of one image's population, timed on a
  few generations after a warm-up, from which the locality job prints the whole
  job's time up front, labelled as an estimate.
"""

from __future__ import annotations

import functools
import os
import time

import jax
import numpy as np

from propmaps_jax import memory, models
from propmaps_jax.errors import PropmapsError

GIB = 1 << 30


def candidate_bytes(module, variables, image_shape=(32, 32, 3)) -> int:
    """Activation bytes of one candidate in a forward of `module`: the library's
    count (`memory.forward_bytes_per_candidate`, the peak of live values in the
    forward's jaxpr; traced, never run)."""
    return memory.forward_bytes_per_candidate(
        models.make_apply_fn(module), variables, image_shape
    )


def available_bytes() -> int | None:
    """Free memory of the first device: the accelerator's (bytes_limit less in
    use) or, on a CPU, the host's MemAvailable; None when unknown."""
    device = jax.devices()[0]
    if device.platform != "cpu":
        stats = device.memory_stats() or {}
        if "bytes_limit" in stats:
            return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


def slot_bytes(module, variables, population: int, pixels: int = 1) -> int:
    """Bytes of one slot of `population` candidates, every term that grows with
    the population or the slots: the candidates' forward activations
    (`candidate_bytes` each), their DE state (three rows of 5 x pixels float32)
    and the slot's DE step, whose partner draws hold population x population
    arrays (`memory.search_bytes_per_slot`)."""
    population = int(population)
    return population * (
        candidate_bytes(module, variables) + 3 * 4 * 5 * pixels
    ) + memory.search_bytes_per_slot(population, pixels)


def check_batch(
    module,
    variables,
    slots: int | None,
    population: int,
    free: int | None = None,
    pixels: int = 1,
) -> None:
    """PropmapsError (one line) when slots x population candidates cannot fit.

    `slots`: a user-given --slots, or None for the library's default (sized by
    backend, at least one image's population per device: that much is checked);
    `free`: the free bytes (default `available_bytes()`). Per device: the slots
    are shared over the local devices. Each slot counts `slot_bytes`.
    """
    free = available_bytes() if free is None else free
    if free is None:
        return
    given = slots is not None
    slots = int(slots) if given else 1
    per_device_slots = -(-slots // max(1, jax.local_device_count()))
    per_slot = slot_bytes(module, variables, population, pixels)
    need = per_device_slots * per_slot
    if need > free:
        fits = free // per_slot
        what = f"--slots={slots} with " if given else ""
        remedy = (
            f"use --slots={fits} or fewer, or leave --slots out for the default"
            if given and fits >= 1
            else "use a --population of at most "
            f"{_largest_population(module, variables, free, pixels)}"
        )
        raise PropmapsError(
            f"{what}--population={population} needs at least {need / GIB:.1f} GiB "
            "per device for the candidates' activations and the DE step "
            f"({per_slot / population / 1024:.0f} KiB per candidate) but "
            f"{free / GIB:.1f} GiB is free; {remedy}"
        )


def _largest_population(module, variables, free: int, pixels: int) -> int:
    """The largest population (at least 4) whose one slot fits in `free` bytes;
    0: none. `slot_bytes` grows with the population, and each population it has
    not seen traces the DE step once (about 0.1 s): a plain bisection traces about
    25. The step's bytes are a quadratic in the population (its population x
    population arrays), so the quadratic through three exact values proposes the
    answer, which exact values at it and one above confirm; where they do not,
    steps from it bracket the answer for a bisection."""

    def fits(population: int) -> bool:
        return slot_bytes(module, variables, population, pixels) <= free

    low, high = 3, max(4, free // max(1, candidate_bytes(module, variables)))
    # Invariant: `low` fits (3 stands for "none"), every population above `high`
    # does not.
    guess = _quadratic_root(
        [(p, slot_bytes(module, variables, p, pixels)) for p in (16, 32, 64)], free
    )
    if guess is not None and low < guess <= high:
        # From the guess, steps doubling until the answer is bracketed (two exact
        # values when the guess is right), then bisection.
        step = 1
        if fits(guess):
            low = guess
            while low < high:
                probe = min(high, low + step)
                if not fits(probe):
                    high = probe - 1
                    break
                low, step = probe, 2 * step
        else:
            high = guess - 1
            while low < high:
                probe = max(low + 1, high - step + 1)
                if fits(probe):
                    low = probe
                    break
                high, step = probe - 1, 2 * step
    while low < high:
        middle = (low + high + 1) // 2
        if fits(middle):
            low = middle
        else:
            high = middle - 1
    return low if low >= 4 else 0


def _quadratic_root(points: list[tuple[int, int]], level: int) -> int | None:
    """The largest integer x with q(x) <= level, q the quadratic through the three
    (x, y) `points`; None when q does not rise to `level` there."""
    (x1, y1), (x2, y2), (x3, y3) = points
    a, b, c = np.linalg.solve(
        np.array([[x * x, x, 1] for x in (x1, x2, x3)], np.float64),
        np.array([y1, y2, y3], np.float64),
    )
    if a <= 0:
        return None
    disc = b * b - 4 * a * (c - level)
    if disc < 0:
        return None
    return int(np.floor((-b + np.sqrt(disc)) / (2 * a)))


def generation_seconds(apply_fn, variables, config, repeats: int = 2) -> float:
    """Seconds of one DE generation of one image: the forward of its `population`
    candidates that the attack engine uses on this backend (the receptive-field
    forward where it is the default, else the plain one), timed after a warm-up
    call (its compile is not counted)."""
    from propmaps_jax import attack

    population = int(config.population)
    images = np.zeros((1, 32, 32, 3), np.float32)
    candidate = attack.default_candidate_forward(
        apply_fn, None, config, jax.default_backend()
    )
    if candidate is not None:
        pixels = np.zeros((1, population, config.pixels, 5), np.float32)
        call = functools.partial(_jitted(candidate), variables, images, pixels)
    else:
        batch = np.repeat(images, population, axis=0)
        call = functools.partial(_jitted(apply_fn), variables, batch)
    jax.block_until_ready(call())
    start = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(call())
    return (time.perf_counter() - start) / repeats


@functools.cache
def _jitted(fn):
    return jax.jit(fn)


def job_estimate(
    work: dict[str, tuple[object, object, int]], config
) -> dict[str, float]:
    """{model: estimated seconds at most} of attacking `images` still to do per
    model (`work`: model -> (apply_fn, variables, images)), from one timed
    generation each: images x (generations + 1) x seconds per generation (every
    attack running every generation; successes stop earlier)."""
    out = {}
    for name, (apply_fn, variables, images) in work.items():
        if images <= 0:
            out[name] = 0.0
            continue
        step = generation_seconds(apply_fn, variables, config)
        out[name] = images * (config.generations + 1) * step
    return out


def announce_job(
    work: dict[str, tuple[object, object, int]],
    samples: dict[str, int],
    config,
    log=print,
) -> dict[str, float]:
    """Print what the locality job will run and its estimated time per model and
    in all (labelled as an estimate), with a way to a first look in minutes when
    it passes an hour. Returns {model: estimated seconds}."""
    from propmaps_jax.progress import format_duration

    log(
        "locality job: "
        + ", ".join(
            f"{n} on {samples[n]} samples"
            + (f" ({samples[n] - work[n][2]} done)" if work[n][2] < samples[n] else "")
            for n in samples
        )
        + ", each attacked then studied"
    )
    generations = config.generations
    estimate = job_estimate(work, config)
    total = sum(estimate.values())
    log(
        "estimated time on this machine, at most (one generation timed per model; "
        f"as if every attack ran all {generations} generations, successes stop "
        "earlier; compiling adds about a minute per model): "
        + ", ".join(f"{n} {format_duration(s)}" for n, s in estimate.items())
        + f"; whole job {format_duration(total)}"
    )
    if total > 3600:
        slowest = max(estimate, key=estimate.get)
        per_image = estimate[slowest] / max(work[slowest][2], 1)
        few = max(1, min(samples[slowest], int(300 / max(per_image, 1e-9))))
        log(
            f"for a first look in minutes: --num_samples_{slowest}={few} (then the "
            "same command with the full count resumes from those images)"
        )
    return estimate
