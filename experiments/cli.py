"""The command line of `python launch.py`: experiment selection, help, flag checks.

Selects the experiment from --experiment, imports `experiments/<NAME>.py` (which
defines its own absl flags) and runs its `main`. `--help` alone lists the
experiments; with --experiment it lists the flags that experiment reads. Errors in
the user's input (a bad flag, a PropmapsError) are printed on one line with exit 2
instead of a traceback or absl's usage text. Nothing heavy is imported before an
experiment is chosen, so `--help` answers at once.
"""

import ast
import copy
import difflib
import functools
import importlib
import os
import re
import sys
import textwrap

from experiments.report.progress import say

EXPERIMENTS = (
    "locality",
    "attack",
    "propagation",
    "statistics",
    "salience",
    "train",
    "evaluate",
    "readings",
)
HELP = {"-h", "-help", "--help", "-helpfull", "--helpfull", "-helpshort", "--helpshort"}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENT_FLAG = re.compile(r"--?experiment(=|$)")


class UsageError(Exception):
    """A command line that cannot run: its message is the one line printed."""


def _options(args: list[str]) -> list[str]:
    """The arguments before `--` (after it, nothing is a flag)."""
    return args[: args.index("--")] if "--" in args else args


def experiment_names(args: list[str]) -> list[str]:
    """Every value given to --experiment (`--experiment=X` or `--experiment X`)."""
    options, names = _options(args), []
    for i, arg in enumerate(options):
        match = EXPERIMENT_FLAG.match(arg)
        if match and match.group(1):
            names.append(arg.split("=", 1)[1])
        elif match:
            names.append(options[i + 1] if i + 1 < len(options) else "")
    return names


def wants_help(args: list[str]) -> bool:
    return any(arg in HELP for arg in _options(args))


def select(args: list[str]) -> str | None:
    """The experiment named by `args`, None when there is none; UsageError when it
    is unknown or given more than once."""
    names = experiment_names(args)
    if len(names) > 1:
        raise UsageError(
            f"--experiment given {len(names)} times ({', '.join(names)}); give it once"
        )
    if names and names[0] not in EXPERIMENTS:
        raise UsageError(
            f"unknown experiment {names[0]!r}; choose one of: {', '.join(EXPERIMENTS)}"
        )
    return names[0] if names else None


# --- What an experiment is (its docstring, read without importing it) and reads
# (the shared flags it declares).


@functools.cache
def _tree(module: str) -> ast.Module:
    path = os.path.join(ROOT, *module.split(".")) + ".py"
    with open(path, encoding="utf-8") as f:
        return ast.parse(f.read())


def summary(name: str) -> str:
    """The first line of an experiment module's docstring."""
    doc = ast.get_docstring(_tree(f"experiments.{name}")) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def flags_read(name: str) -> frozenset[str]:
    """Names of the flags experiment `name` reads: the ones its module defines, the
    shared ones it declares in FLAGS_READ (experiments/flag_groups.py), and
    --precision, which this launcher applies to every experiment. Imports it."""
    from absl import flags

    module = importlib.import_module(f"experiments.{name}")
    own = flags.FLAGS.flags_by_module_dict().get(module.__name__, [])
    return frozenset({*(f.name for f in own), *module.FLAGS_READ, "precision"})


# --- Help texts.


def overview() -> str:
    """`python launch.py --help`: the experiments, one line each."""
    width = max(map(len, EXPERIMENTS))
    lines = [
        "usage: python launch.py --experiment=NAME [flags]",
        "",
        "experiments:",
        *(f"  {name:<{width}}  {summary(name)}" for name in EXPERIMENTS),
        "",
        "python launch.py --experiment=NAME --help lists the flags of one experiment.",
        "docs/experiments.md describes each experiment, its outputs and an example "
        "command.",
    ]
    return "\n".join(lines) + "\n"


def _flag_help(flag) -> str:
    if flag.boolean:
        head = f"--[no]{flag.name}"
    elif getattr(flag.parser, "enum_values", None):
        head = f"--{flag.name}={'|'.join(flag.parser.enum_values)}"
    else:
        head = f"--{flag.name}={flag.flag_type().upper().replace(' ', '_')}"
    if flag.default is not None:
        default = str(flag.default).lower() if flag.boolean else flag.default
        head += f"  (default: {default})"
    # absl starts an enum's help with its choices ("<a|b>: "), already in `head`.
    text = re.sub(r"^<[^>]*>: ", "", flag.help or "")
    body = textwrap.fill(
        text, width=88, initial_indent=" " * 6, subsequent_indent=" " * 6
    )
    return f"  {head}\n{body}"


def experiment_flags(name: str, flag_values) -> tuple[list, list]:
    """(the experiment's own flags, the shared flags it reads), sorted by name: its
    own are those its module defines, the shared ones those it declares."""
    read = flags_read(name)
    own, shared = [], {}
    for module, module_flags in flag_values.flags_by_module_dict().items():
        if not module.startswith("experiments."):
            continue
        for flag in module_flags:
            if module == f"experiments.{name}":
                own.append(flag)
            elif flag.name in read:
                shared[flag.name] = flag
    unknown = read - {*shared, *(f.name for f in own)}
    if unknown:  # a mistake in the experiment's FLAGS_READ, not the user's
        raise ValueError(f"experiments/{name}.py reads undefined flags {unknown}")
    by_name = functools.partial(sorted, key=lambda f: f.name)
    return by_name(own), by_name(shared.values())


def experiment_help(name: str, flag_values) -> str:
    """`python launch.py --experiment=NAME --help`: the flags that NAME reads."""
    own, shared = experiment_flags(name, flag_values)
    lines = [f"usage: python launch.py --experiment={name} [flags]", summary(name)]
    if own:
        lines += ["", f"flags of {name}:", *map(_flag_help, own)]
    lines += ["", "shared flags it reads:", *map(_flag_help, shared)]
    return "\n".join(lines) + "\n"


# --- Parsing.


def parse_flags(name: str, argv: list[str], flag_values) -> None:
    """Parse `argv` into `flag_values` as the experiment `name` runs it: UsageError
    (one line) for a bad flag, a positional argument, or a flag of the experiments
    that this one does not read."""
    from absl import flags

    see = f"python launch.py --experiment={name} --help lists its flags"

    def not_a_flag(flag: str) -> UsageError:
        close = difflib.get_close_matches(flag, sorted(applies), n=1)
        hint = f" (did you mean --{close[0]}?)" if close else ""
        return UsageError(f"--{flag} is not a flag of --experiment={name}{hint}; {see}")

    own, shared = experiment_flags(name, flag_values)
    applies = {f.name for f in own + shared}
    try:
        rest = flag_values(argv)
    except flags.UnrecognizedFlagError as e:
        raise not_a_flag(e.flagname) from None
    except flags.Error as e:
        raise UsageError(f"{' '.join(str(e).split())}; {see}") from None
    if len(rest) > 1:
        raise UsageError(f"unexpected arguments: {' '.join(rest[1:])}")
    # A flag defined by another experiment imported alongside (locality imports
    # attack) or a shared one that this experiment never reads is refused too.
    for module, module_flags in flag_values.flags_by_module_dict().items():
        if not module.startswith("experiments.") or module == __name__:
            continue  # this module defines only --experiment
        for flag in module_flags:
            if flag.present and flag.name not in applies:
                raise not_a_flag(flag.name)
    check_values(flag_values)


# --- Values: every number checked before any work, in one place.

INT32_MAX = 2**31 - 1
# The CIFAR-10 image (height, width) that pixel counts and distances must fit.
IMAGE_HW = (32, 32)
# flag: (smallest, largest, why) for flags whose bounds follow from what a run
# can do; the experiments check the rest (e.g. --population >= 4) themselves.
BOUNDS = {
    # One rule for every experiment: a seed is a non-negative 31-bit integer
    # (numpy's generators refuse negative seeds; jax would take them).
    "seed": (0, INT32_MAX, "a seed is an integer in 0..2147483647"),
    "pixels": (1, IMAGE_HW[0] * IMAGE_HW[1], "pixels changed per 32x32 image"),
    "max_distance": (1, max(IMAGE_HW) - 1, "a Chebyshev distance within a 32x32 image"),
    "columns": (1, 1000, "figure panels per row"),
    "index": (0, INT32_MAX, "a test image index"),
    "num_processes": (1, 1 << 16, "processes of a multi-host run"),
    "process_id": (0, 1 << 16, "this process's id"),
}
# Counts that must be at least 1, in the words the experiments use for them (the
# other counts are checked by their experiments, with their own messages).
COUNTS = ("num_samples", "chunk_size")


def check_values(flag_values) -> None:
    """UsageError (one line) for a number no run can use: an integer beyond 32
    bits, a negative seed, more pixels than the image has, a distance beyond the
    image, a count below 1, a non-positive --max_minutes."""
    for name in flag_values:
        flag = flag_values[name]
        value = flag.value
        if not flag.present or isinstance(value, bool):
            continue
        if isinstance(value, int):
            if not -INT32_MAX - 1 <= value <= INT32_MAX:
                raise UsageError(
                    f"--{name}={value} is beyond a 32-bit integer (at most {INT32_MAX})"
                )
            if name in BOUNDS:
                low, high, why = BOUNDS[name]
                if not low <= value <= high:
                    raise UsageError(
                        f"--{name}={value} is out of range: {why}, {low}..{high}"
                    )
            if (name in COUNTS or name.startswith("num_samples_")) and value < 1:
                raise UsageError(f"--{name} must be >= 1, got {value}")
        elif isinstance(value, float) and name == "max_minutes":
            if not (value > 0 and value < 1e7):
                raise UsageError(
                    f"--max_minutes must be a positive number of minutes, got {value}"
                )


def _define_experiment_flag(name: str, flag_values) -> None:
    from absl import flags

    if "experiment" not in flag_values:
        flags.DEFINE_enum(
            "experiment",
            name,
            EXPERIMENTS,
            "Which experiment to run.",
            flag_values=flag_values,
        )


def check(args: list[str]) -> str:
    """Check a command line (the arguments after `launch.py`) as `main` would parse
    it, without running anything or changing the global flags; returns the
    experiment's name, raises UsageError with the line `main` would print."""
    from absl import flags

    name = select(args)
    if name is None:
        raise UsageError("missing --experiment")
    importlib.import_module(f"experiments.{name}")
    flag_values = copy.deepcopy(flags.FLAGS)
    _define_experiment_flag(name, flag_values)
    parse_flags(name, ["launch.py", *args], flag_values)
    return name


def _fail(message: str) -> None:
    say(f"error: {message}")
    sys.exit(2)


def main() -> None:
    args = sys.argv[1:]
    try:
        name = select(args)
    except UsageError as e:
        _fail(str(e))
    if name is None:
        if not args or wants_help(args):
            sys.stdout.write(overview())
            return
        _fail(
            f"missing --experiment; choose one of: {', '.join(EXPERIMENTS)} "
            "(python launch.py --help describes them)"
        )

    from absl import app, flags

    _define_experiment_flag(name, flags.FLAGS)
    module = importlib.import_module(f"experiments.{name}")
    if wants_help(args):
        sys.stdout.write(experiment_help(name, flags.FLAGS))
        return

    from experiments import common
    from experiments.runs import stopping
    from propmaps_jax.errors import PropmapsError

    def parse(argv: list[str]) -> list[str]:
        try:
            parse_flags(name, argv, flags.FLAGS)
        except UsageError as e:
            _fail(str(e))
        return argv[:1]

    def run(argv: list[str]) -> None:
        import logging

        import jax

        from experiments.runs import lock as runlock
        from experiments.runs import rundir

        # JAX logs "Unable to initialize backend 'tpu'" at INFO on every machine
        # without one: noise, not news (a platform asked for and missing is an
        # error, which this leaves alone).
        logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)

        # One writer per workdir: every experiment's --workdir is locked for the
        # run (multi-host runs excepted: see runlock).
        workdir = flags.FLAGS.workdir or getattr(module, "DEFAULT_WORKDIR", None)
        locked = None
        stopping.handle_sigterm()
        try:
            if workdir:  # a name its filesystem refuses: before any loading
                rundir.check_name_lengths(workdir)
            if not flags.FLAGS.distributed:  # before the lock (see start_backend)
                common.start_backend()
            if workdir and not flags.FLAGS.distributed:
                locked = workdir if runlock.acquire(workdir) else None
            with jax.default_matmul_precision(flags.FLAGS.precision):
                module.main(argv)
        except PropmapsError as e:
            _fail(common.in_flag_terms(str(e)))
        except (KeyboardInterrupt, stopping.TimeLimit, OSError) as e:
            stopping.exit_when_stopped(e, workdir)
            raise
        finally:
            stopping.start_deadline(None)  # --max_minutes ends with its run
            if locked:
                runlock.release(locked)

    app.run(run, flags_parser=parse)


def run() -> None:
    """`main`, with Ctrl-C as one line and exit 130, SIGTERM exit 143 (resumable
    experiments say more)."""
    try:
        main()
    except KeyboardInterrupt as e:
        from experiments.runs import stopping

        stopping.stopping()
        terminated = type(e).__name__ == "Terminated"
        say("terminated (SIGTERM)" if terminated else "interrupted")
        sys.exit(143 if terminated else 130)
