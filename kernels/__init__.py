"""cmc-fast's kernels: fused Triton ops with a PyTorch reference beside each (DESIGN section 3).

Imports nothing from ``cmc_fast`` or ``data_pipeline``. Set ``TRITON_INTERPRET=1`` *before* importing this
package to run the Triton paths on CPU tensors.
"""

import sys

if __name__ == "kernels":
    # This folder imported as a top-level ``kernels`` (a checkout's root on sys.path: transformers probes for
    # Hugging Face's ``kernels`` by importing that name) must not define the cmc_fast:: custom ops a second time:
    # the two registrations of one op crashed processes at random (SIGSEGV in an op's dispatch, bad_alloc). The
    # top-level name is made cmc_fast.kernels itself.
    import cmc_fast.kernels

    sys.modules[__name__] = cmc_fast.kernels
else:
    from .block import block_merge, block_merge_sum
    from .dispatch import kernel_mode, use_triton
    from .nce import bank_update_, nce_loss, nce_partition
    from .reference import block_chunk_sizes, block_flat_offsets

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
