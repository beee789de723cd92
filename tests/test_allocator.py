"""vaegan.allocator: with glibc set by keep_freed_memory, a step's buffers stop page-faulting.

Each process is fresh (the setting is process-wide): the demo's step (mnist32, one thread)
counts the page faults of its median step of five, after two of warm-up (the heap may still
grow once then), as glibc leaves it and as the training workers set it."""

import platform
import subprocess
import sys

import pytest

STEP_FAULTS = """
import resource, sys, torch
from vaegan.allocator import keep_freed_memory
from vaegan.config import load_config
from vaegan.model import VAEGAN
from vaegan.step import TrainStep
if sys.argv[1] == "kept":
    assert keep_freed_memory()
torch.set_num_threads(1)
cfg = load_config("mnist32")
step = TrainStep.for_model(VAEGAN(cfg.model), cfg)
x = torch.rand(cfg.data.batch_size, 1, 32, 32) * 2 - 1
for _ in range(2):
    step(x)
counts = []
for _ in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step(x)
    counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sorted(counts)[2])
"""


def faults_per_step(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", STEP_FAULTS, mode], capture_output=True, text=True,
                         timeout=300, check=True)
    return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_a_step_stops_page_faulting():
    default, kept = faults_per_step("default"), faults_per_step("kept")
    assert default > 1000, f"glibc's defaults should fault a step's buffers in; got {default:.0f} a step"
    assert kept < default / 50, f"{kept:.0f} page faults a step with the memory kept, {default:.0f} without"
