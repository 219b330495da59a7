"""The one-pixel attack on CIFAR-10 test images: attack.csv + attack_summary.json.

python launch.py --experiment=attack --model=resnet --weights=PATH \
    --num_samples=5000 --seed=0 --workdir=DIR [--pixels=1 --population=400
    --generations=100 --target=none|CLASS|all --sample=first|random]

Everything (flags, workdir, weights loaded against --model, data) is checked
before anything is written; DIR is created with the first result. Results are kept
chunk by chunk in DIR/.attack_chunks/ (each chunk written atomically); a run
stopped by Ctrl-C (exit 130), SIGTERM (143), --max_minutes (75) or a failed write
(74), each with one line, or killed, started again with the same flags, resumes
after the last finished chunk, and the final files equal those of an
uninterrupted run (apart from timings in the summary). The same weights under
another path resume; other weights, data or settings are refused in one line
naming the difference. With --target=all each target class gets its own
DIR/target_<c>/ run and DIR/attack_summary.json aggregates them. The run itself
(chunks, resume, the settings that identify a run) is `experiments/runs/attack_run.py`.
"""

from __future__ import annotations

import sys

from absl import flags

from experiments import common, flag_groups
from experiments.report.progress import say
from experiments.runs import attack_run, stopping

FLAGS = flags.FLAGS
# The shared flags this experiment reads (experiments/flag_groups.py); the attack's
# own settings are defined in experiments/runs/attack_run.py (locality reads them).
FLAGS_READ = (
    *flag_groups.RUN,
    *flag_groups.MODEL,
    *flag_groups.ATTACK,
    *flag_groups.DISTRIBUTED,
    "seed",
    "max_minutes",
)


def main(argv: list[str]) -> None:
    """Run the attack experiment from flags.

    Flags, workdir, weights (loaded and checked against --model) and data are
    checked before anything is written; Ctrl-C keeps the finished chunks.
    """
    del argv
    stopping.start_deadline(FLAGS.max_minutes)
    if FLAGS.distributed:
        common.initialize_distributed(
            FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id
        )
    options = attack_run.attack_options(FLAGS)
    options.check()
    workdir = common.require_workdir(FLAGS.workdir, create=False)
    loaded = common.load_model(FLAGS.model, FLAGS.weights)
    dataset = common.load_data(FLAGS.cifar10_path, FLAGS.data_split)
    run = attack_run.run_attack(
        workdir,
        model_name=FLAGS.model,
        weights=FLAGS.weights,
        dataset=dataset,
        loaded=loaded,
        **options.arguments(),
    )
    if run is not None:  # the first process (the others take part in the attack)
        summary = run.summary
        # The result, on stdout (progress and logs go to stderr).
        say(
            f"success rate {100 * summary.get('success_rate_attacked', 0.0):.2f}% of "
            f"{summary.get('attacked', 0)} attacked images "
            f"({100 * summary.get('success_rate_all', 0.0):.2f}% of all "
            f"{summary.get('num_samples', 0)} samples); results in {workdir}",
            sys.stdout,
        )
