"""The project's results formats: what each file of a run holds and how it is read.

`pip install` gives the library alone, so the files a researcher keeps (an
attack's attack.csv with its summary and chunks, a model's locality.csv, the
controls' controls.csv, the statistics' claims.json) are described, written as
text and read back here, with the rules every row obeys, and tested in
tests/lib/. The shell (`experiments/runs`) owns the run directory: where the
files go, atomic writes, the lock, resuming.

    from propmaps_jax import results
    run = results.read_attack_results("docs/results/lenet_1000_cpu/attack.csv")
    run.success.mean(), run.pixels.shape  # (N, k, 5): row, col, r, g, b

Modules: `attack_csv`, `locality_csv`, `controls_csv`, `salience_csv`,
`claims_json`, `statistics_json`; the hashes that results record (`hashing`) and
that identify a model's weights and data (`provenance`).
"""

from propmaps_jax.results.attack_csv import AttackResults, read_attack_results

__all__ = ["AttackResults", "read_attack_results"]

from propmaps_jax._lazy import submodule_getattr  # noqa: E402

__getattr__ = submodule_getattr(__name__, __path__)
