"""Suite-wide setting: one compute thread per process.

The tests train and sample tiny models, which gain nothing from a second thread, and on a machine
that other work also uses two OpenMP threads per process spin against each other: beside one CPU
hog on a 2-vCPU AMD EPYC (2026-12-01, load average 3), the embedded default's training step ran at
122 images/s with one thread and 62 with two (`bench perf --scale embedded --kinds train --specs
latent_only --threads N`). Set before torch is imported, so the subprocesses the tests start (the
CLI, DDP ranks, local-executor jobs) inherit it; a value already in the environment is kept.
"""

import os

for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")
