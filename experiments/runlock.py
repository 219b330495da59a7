"""Moved to `experiments.runs.lock`: the same module under its old name."""

import sys

from experiments.runs import lock as _module

sys.modules[__name__] = _module
