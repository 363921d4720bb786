"""The toolkit's ops in one place: fused Triton kernels with a PyTorch reference beside each (DESIGN section 3).

They live in ``cmc_fast.kernels`` (the folder ``kernels/``, one file per op); this module only names them. Set
``TRITON_INTERPRET=1`` *before* the first import to run the Triton paths on CPU tensors.
"""

from cmc_fast.kernels.bank import bank_update_
from cmc_fast.kernels.block import block_merge, block_merge_sum
from cmc_fast.kernels.dispatch import kernel_mode, use_triton
from cmc_fast.kernels.nce import nce_counts, nce_counts_for, nce_loss, nce_partition
from cmc_fast.kernels.nce_plan import nce_paths_taken
from cmc_fast.kernels.reference import block_chunk_sizes, block_flat_offsets

__all__ = [
    "nce_loss",
    "nce_partition",
    "nce_counts",
    "nce_counts_for",
    "nce_paths_taken",
    "bank_update_",
    "block_merge",
    "block_merge_sum",
    "block_chunk_sizes",
    "block_flat_offsets",
    "kernel_mode",
    "use_triton",
]
