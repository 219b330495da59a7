"""The shared flags, in groups: each experiment lists the ones it reads.

Each experiment module sets `FLAGS_READ`, the shared flags it reads (its own
flags, defined in its module, always apply). `python launch.py
--experiment=NAME --help` shows exactly its own flags and these, and the launcher
refuses any other flag of the experiments (an unused shared flag, or a flag of an
experiment imported alongside) with one line. --precision is applied by the
launcher to every experiment and need not be listed.

Names only (no absl here): the flags themselves are defined in experiments/common.py
(the shared ones) and experiments/runs/attack_run.py (the attack's, read by the
attack and locality experiments).
"""

# Every experiment: where its input and output are, and which split of the input
# it attacks or evaluates (passed to common.load_data).
RUN = ("cifar10_path", "data_split", "workdir")
# One model to load: --model and its weights.
MODEL = ("model", "weights")
# A multi-host run (jax.distributed).
DISTRIBUTED = ("distributed", "coordinator_address", "num_processes", "process_id")
# Propagation-map figures.
FIGURES = ("columns", "layers", "signed")
# The one-pixel attack's settings (defined in experiments/runs/attack_run.py).
ATTACK = (
    "chunk_size",
    "generations",
    "num_samples",
    "pixels",
    "population",
    "sample",
    "search_dtype",
    "slots",
    "target",
)
