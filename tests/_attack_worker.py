"""Helper process for tests/lib/test_attack_distributed.py: attack a fixed tiny case.

python tests/_attack_worker.py OUT.npz [PROCESS_ID NUM_PROCESSES COORDINATOR]
Writes the AttackResult fields (process 0 only) and the device/process counts.
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402

if len(sys.argv) > 2:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=sys.argv[4],
        num_processes=int(sys.argv[3]),
        process_id=int(sys.argv[2]),
    )

import numpy as np  # noqa: E402

from tests._attack_case import SLOTS, attack_case  # noqa: E402

result = attack_case(slots=SLOTS)
if jax.process_index() == 0:
    np.savez(
        sys.argv[1],
        device_count=jax.device_count(),
        process_count=jax.process_count(),
        **result._asdict(),
    )
