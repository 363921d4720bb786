"""The GPUs the kernels are planned and reported for: one table of their figures, the occupancy rule of one SM, the
SM count of a device, and the issue bound. Shared by the launch plans (``nce_plan``, ``block_plan``) and the static
sm_90 report (``hopper_build``, ``sm90_report``); imports nothing of theirs.
"""

from __future__ import annotations

import functools

import torch

# Per GPU: SMs, the clock of the issue bound, HBM bandwidth (bytes/s) and dense peak FLOP rates per precision (the
# datasheets quote tensor-core rates "with sparsity": half of that is dense). Each value names its source; None: not
# known here (owed to a measurement on the device). "measured" values are someone's measurement, not this project's.
GPUS = {
    "H100 SXM": {
        "sms": 132,  # NVIDIA H100 whitepaper: 132 SMs on the SXM5 part
        "clock_hz": 1.98e9,  # the boost clock its FP32 rate implies: 67e12 / (132 SMs x 128 lanes x 2 FLOP)
        "hbm": 3.35e12,  # NVIDIA H100 Tensor Core GPU datasheet, H100 SXM column: 3.35 TB/s (HBM3)
        "hbm_measured": None,  # owed: no H100 copy measured in this project yet
        "l2_measured": None,  # owed: NVIDIA publishes no L2 bandwidth; measure a gather over an L2-resident bank
        "fp32": 67e12,  # idem: FP32 67 TFLOPS (no tensor cores)
        "tf32": 494.7e12,  # idem: TF32 Tensor Core 989 TFLOPS with sparsity -> 494.7 dense
        "bf16": 989.4e12,  # idem: BF16 Tensor Core 1,979 TFLOPS with sparsity -> 989.4 dense (FP16 the same)
    },
    "H100 PCIe": {
        "sms": 114,  # NVIDIA H100 whitepaper: 114 SMs on the PCIe part
        "clock_hz": 1.755e9,  # its boost clock (51e12 / (114 x 128 x 2) = 1.75 GHz agrees)
        "hbm": 2.0e12,  # NVIDIA H100 Tensor Core GPU datasheet, H100 PCIe column: 2 TB/s (HBM2e)
        "hbm_measured": None,  # owed
        "l2_measured": None,  # owed
        "fp32": 51e12,  # idem: FP32 51 TFLOPS
        "tf32": 378e12,  # idem: TF32 Tensor Core 756 TFLOPS with sparsity -> 378 dense
        "bf16": 756.5e12,  # idem: BF16 Tensor Core 1,513 TFLOPS with sparsity -> 756.5 dense
    },
    "H200": {
        "sms": 132,  # same GH100 die configuration as the H100 SXM
        "clock_hz": 1.98e9,  # as the H100 SXM (the same FP32 rate)
        "hbm": 4.8e12,  # NVIDIA H200 Tensor Core GPU datasheet, H200 SXM column: 4.8 TB/s (HBM3e)
        "hbm_measured": 4.3e12,  # issue #11: a device-to-device copy on an H200 reaches ~4.3 TB/s
        "l2_measured": None,  # owed, as for the H100
        "fp32": 67e12,  # idem: FP32 67 TFLOPS
        "tf32": 494.7e12,  # idem: TF32 Tensor Core 989 TFLOPS with sparsity -> 494.7 dense
        "bf16": 989.4e12,  # idem: BF16 Tensor Core 1,979 TFLOPS with sparsity -> 989.4 dense
    },
}
DEFAULT_GPU = "H100 SXM"  # the entry planned for where no device says otherwise (a CPU, the static report)

# Resident-block limits of one sm_90 SM (CUDA C Programming Guide, "Compute Capabilities", table of technical
# specifications for compute capability 9.0): they bound how many programs run at once, hence the waves.
HOPPER_SMS = GPUS["H100 SXM"]["sms"]  # H100 SXM and H200: 132 SMs
REGISTERS_PER_SM = 65536
REGISTER_ALLOC_UNIT = 256  # registers are allocated per warp in units of 256 (8 per thread)
SHARED_PER_SM = 228 * 1024
SHARED_RESERVED_PER_BLOCK = 1024  # the runtime reserves 1 KB of shared memory per resident block
THREADS_PER_SM = 2048  # 64 warps
BLOCKS_PER_SM = 32
SCHEDULERS_PER_SM = 4  # warp schedulers, each issuing at most one instruction a cycle (H100 whitepaper: 4 SMSPs)


def resident_blocks(registers: int | None, shared: int, num_warps: int, *, registers_per_sm: int = REGISTERS_PER_SM,
                    threads_per_sm: int = THREADS_PER_SM, shared_per_sm: int = SHARED_PER_SM) -> int:
    """Blocks of ``num_warps`` warps one SM holds at once (the occupancy calculator's rules), limited by registers
    (allocated per warp in units of 256; ``None``: not known, no limit), shared memory (1 KB reserved per block),
    threads and 32 blocks. Defaults: an sm_90 SM; a launcher passes its device's own figures. 0: does not fit."""
    limits = [BLOCKS_PER_SM, threads_per_sm // (32 * num_warps),
              shared_per_sm // (shared + SHARED_RESERVED_PER_BLOCK)]
    if registers:
        per_warp = -(-registers * 32 // REGISTER_ALLOC_UNIT) * REGISTER_ALLOC_UNIT
        limits.append(registers_per_sm // (per_warp * num_warps))
    return max(0, min(limits))


def device_resident_blocks(registers: int, shared: int, num_warps: int, device: torch.device | str) -> int:
    """``resident_blocks`` with the limits ``device`` reports (an sm_90 SM's where its properties do not say)."""
    props = torch.cuda.get_device_properties(torch.device(device))
    return resident_blocks(registers, shared, num_warps,
                           registers_per_sm=getattr(props, "regs_per_multiprocessor", REGISTERS_PER_SM),
                           threads_per_sm=getattr(props, "max_threads_per_multi_processor", THREADS_PER_SM),
                           shared_per_sm=getattr(props, "shared_memory_per_multiprocessor", SHARED_PER_SM))


def sm_count(device: torch.device | str | None = None) -> int:
    """SMs of ``device``: its own count on a GPU (None: the current CUDA device), else the ``DEFAULT_GPU``'s."""
    device = torch.device("cuda") if device is None else torch.device(device)
    if device.type != "cuda":
        return GPUS[DEFAULT_GPU]["sms"]
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=8)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def gpu_name(device: torch.device | str) -> str:
    """The key of ``GPUS`` for a device: by its name (H200, H100 PCIe), else the ``DEFAULT_GPU``."""
    return _gpu_name_of(str(torch.device(device)))


@functools.lru_cache(maxsize=16)
def _gpu_name_of(device: str) -> str:
    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" and torch.cuda.is_available() else ""
    if "H200" in name:
        return "H200"
    return "H100 PCIe" if "PCIe" in name else DEFAULT_GPU


@functools.lru_cache(maxsize=16)
def device_timing(device: str) -> dict:
    """SM count and clock of the issue bound: the device's own where it says them (its SM count; its clock where
    torch's properties carry ``clock_rate``, in kHz), the ``GPUS`` entry of its name otherwise."""
    spec = GPUS[gpu_name(device)]
    timing = {"sms": spec["sms"], "clock_hz": spec["clock_hz"]}
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(device)
        timing["sms"] = props.multi_processor_count
        if getattr(props, "clock_rate", 0):
            timing["clock_hz"] = props.clock_rate * 1e3
    return timing


def issue_bound_s(instructions_per_warp: int, num_warps: int, programs: int, sms: int, clock_hz: float) -> float:
    """Seconds one launch takes at best if every warp scheduler issues one instruction a cycle (4 per sm_90 SM) and
    nothing else limits it: the busiest SM runs ceil(programs / sms) programs, their warps spread over its 4
    schedulers. A lower bound on the launch (latency, the tensor pipe and memory can only add), not a prediction."""
    per_sm = -(-programs // sms) * num_warps
    return -(-per_sm // SCHEDULERS_PER_SM) * instructions_per_warp / clock_hz
