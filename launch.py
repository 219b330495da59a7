"""Single entry point: `python launch.py --experiment=NAME [flags]`.

`python launch.py --help` lists the experiments, `--experiment=NAME --help` the
flags of one. The command line itself lives in `experiments/cli.py`.
"""

from experiments.cli import (  # noqa: F401 (the names tests and users call)
    EXPERIMENTS,
    UsageError,
    check,
    flags_read,
    main,
    run,
    summary,
)

if __name__ == "__main__":
    run()
