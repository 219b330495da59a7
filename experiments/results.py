"""Moved to `experiments.runs.attack_csv`: the same module under its old name."""

import sys

from experiments.runs import attack_csv as _module

sys.modules[__name__] = _module
