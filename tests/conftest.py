"""Test-session settings shared by every test module."""

import torch

# The models under test are tiny: one intra-op thread is faster and keeps timings stable on a
# loaded 2-core machine.
torch.set_num_threads(1)
