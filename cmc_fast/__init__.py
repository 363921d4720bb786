"""cmc-fast: CMC (Wei et al., ICASSP 2022) cross-modal knowledge distillation for multi-modal fake news
detection, with fused Triton kernels for the NCE memory-bank scoring and BLOCK fusion."""

__version__ = "0.1.0"
