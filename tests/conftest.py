"""Test-wide settings."""

import torch

# The tests train tiny models; on a 2-core machine a second OpenMP thread only adds barrier
# waits (10x slower when the cores are busy), so the whole suite runs single-threaded.
torch.set_num_threads(1)
