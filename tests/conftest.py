"""Test-session settings shared by every test module."""

import torch

# The suite runs on 2 shared cores beside other processes: torch at 2 intra-op threads then spins
# against them and ran the ddm_models tests ~15x slower (152 s vs 9.5 s for test_training.py).
torch.set_num_threads(1)
