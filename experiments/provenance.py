"""Moved to `experiments.runs.provenance`: the same module under its old name."""

import sys

from experiments.runs import provenance as _module

sys.modules[__name__] = _module
