"""The run directory: where and how every experiment keeps its files.

- `storage`: file operations on a local disk or gs:// (the only module that
  knows the difference).
- `rundir`: atomic writes, JSON, the workdir check, reuse only under the same
  settings; `lock`: one writer per run directory.
- `integrity`: reuse of a run's files only while their records hold;
  `chunks`: the attack's chunk store (resume, damaged and stale chunks);
  `budget`: batch memory and the job's time; `stopping`: how a run stops
  (Ctrl-C, SIGTERM, --max_minutes, a failed write), one line each.
- The file formats (attack.csv, attack_summary.json, chunks, locality.csv,
  controls.csv, claims.json, the content hashes and provenance) are the
  library's: `propmaps_jax.results`, which `pip install` alone reads.
"""
