"""Single entry point: `python launch.py --experiment=NAME [flags]`.

Parses only --experiment, imports `experiments/<NAME>.py` (which defines its own
absl flags) and runs its `main`. Errors in the user's input (PropmapsError) are
printed on one line with a non-zero exit instead of a traceback.
"""

import importlib
import sys

from absl import app, flags

EXPERIMENTS = (
    "locality",
    "attack",
    "propagation",
    "statistics",
    "salience",
    "train",
    "evaluate",
)


def _experiment_name(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg.startswith("--experiment="):
            return arg.split("=", 1)[1]
        if arg == "--experiment" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def main() -> None:
    name = _experiment_name(sys.argv[1:])
    if name not in EXPERIMENTS:
        what = (
            "missing --experiment" if name is None else f"unknown experiment {name!r}"
        )
        sys.stderr.write(f"error: {what}; choose one of: {', '.join(EXPERIMENTS)}\n")
        sys.exit(2)
    flags.DEFINE_enum("experiment", name, EXPERIMENTS, "Which experiment to run.")
    module = importlib.import_module(f"experiments.{name}")

    from experiments import common
    from propmaps_jax.errors import PropmapsError

    def run(argv: list[str]) -> None:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
        try:
            common.under_precision(module.main)(argv)
        except PropmapsError as e:
            sys.stderr.write(f"error: {common.in_flag_terms(str(e))}\n")
            sys.exit(2)

    app.run(run)


if __name__ == "__main__":
    main()
