"""Moved to `experiments.runs.integrity`: the same module under its old name."""

import sys

from experiments.runs import integrity as _module

sys.modules[__name__] = _module
