"""cmc-fast's kernels: fused Triton ops with a PyTorch reference beside each (DESIGN section 3).

Imports nothing from ``cmc_fast`` or ``data_pipeline``. Set ``TRITON_INTERPRET=1`` *before* importing this
package to run the Triton paths on CPU tensors.
"""

import importlib
import sys

if __name__ == "cmc_fast.kernels":
    from .block import block_merge, block_merge_sum
    from .dispatch import kernel_mode, use_triton
    from .nce import bank_update_, nce_loss, nce_partition
    from .reference import block_chunk_sizes, block_flat_offsets
else:
    # Imported as a top-level "kernels": in a source checkout this folder sits on sys.path, and transformers probes
    # for Hugging Face's package of that name by importing it. A second copy would register the cmc_fast:: ops a
    # second time and leave the first copy's handles dangling (segfaults at the next op call, at random with the
    # garbage collector); so this name becomes cmc_fast.kernels itself.
    sys.modules[__name__] = importlib.import_module("cmc_fast.kernels")

__all__ = [
    "nce_loss",
    "nce_partition",
    "bank_update_",
    "block_merge",
    "block_merge_sum",
    "block_chunk_sizes",
    "block_flat_offsets",
    "kernel_mode",
    "use_triton",
]
