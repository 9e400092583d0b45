"""udpflannel: a Flannel-compatible Layer-3 pod network whose datapath runs in userspace."""

import os

# numpy's bundled OpenBLAS starts a spinning thread per core at import (0.09-0.2 CPU-s each time a
# process starts, on two cores) for matrix work the datapath never does; one thread is enough. Set before
# anything here imports numpy, and inherited by the worker processes the agent starts.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

__version__ = "0.1.0"
