"""In a source checkout the folder kernels/ is on sys.path when Python runs from the repository root, and
transformers probes for Hugging Face's top-level ``kernels`` package by importing it. That import must give
``cmc_fast.kernels`` itself: a second copy would register the ``cmc_fast::`` ops twice and leave the first
copy's op handles dangling (random segfaults at the next op call)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECK = """
import importlib, sys
importlib.import_module(sys.argv[1])
import cmc_fast.kernels, kernels, torch
assert kernels is cmc_fast.kernels, (kernels, cmc_fast.kernels)
assert not [m for m in sys.modules if m.startswith("kernels.")]
x = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
bank = torch.nn.functional.normalize(torch.randn(10, 8), dim=1)
print(float(torch.ops.cmc_fast.nce_partition(x, bank, torch.randint(0, 10, (4, 3)), 0.07, 10)))
"""


@pytest.mark.parametrize("first", ["cmc_fast.kernels", "kernels"])
def test_a_top_level_kernels_import_from_the_checkout_is_cmc_fast_kernels(first):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", CHECK, first], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert float(proc.stdout.strip()) > 0
