"""Test-session setup: one intra-op thread per process.

Test models are tiny; several processes (DataLoader workers, 2-rank gloo jobs) share 2 cores. With more
than one OpenMP thread per process the threads spin-wait on each other and tiny steps get ~10× slower,
so every process the suite starts runs single-threaded (subprocesses inherit the variable).
"""

import os

os.environ["OMP_NUM_THREADS"] = "1"
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(1)
