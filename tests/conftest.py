"""Suite-wide settings: one compute thread per process, and Ctrl-C as a terminal delivers it.

The tests train and sample tiny models, which gain nothing from a second thread, and on a machine
that other work also uses two OpenMP threads per process spin against each other (beside a CPU hog
one thread trained faster than two: docs/embedded.md, "Lanes and threads"). Set before torch is
imported, so the subprocesses the tests start (the CLI, DDP ranks, local-executor jobs) inherit it;
a value already in the environment is kept.

SIGINT: a shell starts background commands (`bash .ci/run &`, `nohup ... &`) with SIGINT ignored,
and an ignored signal stays ignored in every process started after it; Python then never raises
KeyboardInterrupt. The Ctrl-C and parent-death tests send SIGINT to the processes they start, so
the suite installs Python's own handler: a handled signal is reset to the default in a child at
exec, as under a terminal. (Measured: all three such tests failed under `bash .ci/run &`.)
"""

import os
import signal

for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")

signal.signal(signal.SIGINT, signal.default_int_handler)
