"""Test-session settings shared by every test module."""

import os

import torch
from hypothesis import settings

# The models under test are tiny: one intra-op thread is faster and keeps timings stable on a
# loaded 2-core machine.
torch.set_num_threads(1)

# CI explores the same examples on every run; locally hypothesis keeps searching new ones.
settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    settings.load_profile("ci")
