"""Moved to `experiments.runs.rundir`: the same module under its old name."""

import sys

from experiments.runs import rundir as _module

sys.modules[__name__] = _module
