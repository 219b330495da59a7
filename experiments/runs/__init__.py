"""The run directory: where and how every experiment keeps its files.

- `storage`: file operations on a local disk or gs:// (the only module that
  knows the difference).
- `rundir`: atomic writes, JSON, the workdir check, reuse only under the same
  settings; `lock`: one writer per run directory.
- `integrity`: what made each file and the check every reader applies;
  `provenance`: the content hashes that identify a model's weights and data;
  `budget`: batch memory and the job's time.
- One module per file format, writer and reader together: `attack_csv`
  (attack.csv, attack_summary.json and the chunk store they are built from),
  `locality_csv` (a model's locality.csv).
"""
