"""Test-wide settings: everything runs offline on the CPU."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402 (after the offline switches)

# One intra-op thread for the whole run: the tiny test models are several times faster on one
# thread (more only add synchronisation), and the DDP tests fork worker processes, which hang
# if this process has already started a multi-threaded OpenMP pool.
torch.set_num_threads(1)
