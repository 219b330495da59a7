"""Moved to `experiments.runs.budget`: the same module under its old name."""

import sys

from experiments.runs import budget as _module

sys.modules[__name__] = _module
