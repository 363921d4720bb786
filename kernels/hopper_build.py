"""Build a Triton kernel for Hopper (sm_90) without a GPU, and read what ptxas says of it.

The interpreter (how the tests run kernels on a CPU) checks neither code generation (libdevice calls, tl.dot's
minimum tiles, types across branches) nor resources. ``build`` compiles one specialisation with Triton's bundled
ptxas and returns its shared memory and, where that ptxas can be found, its registers and spilled bytes.
Code generation does not work under TRITON_INTERPRET=1: call this in a process without it (the tests do).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

HOPPER = GPUTarget("cuda", 90, 32)
SHARED_PER_BLOCK = 227 * 1024  # the most shared memory one block may use on an H100/H200


@dataclass
class Build:
    shared: int  # bytes of shared memory per block
    registers: int | None  # per thread; None when ptxas was not found
    spilled: int | None  # the larger of spill stores and spill loads, bytes; None when ptxas was not found


def _ptxas() -> str | None:
    try:  # Triton >= 3.4
        from triton.backends.nvidia.compiler import get_ptxas
        return get_ptxas(HOPPER.arch).path
    except Exception:  # noqa: BLE001 - older layouts: no register report, the build itself still runs
        return None


def ptxas_report(ptx: str) -> tuple[int | None, int | None]:
    """(registers per thread, spilled bytes) of PTX built for sm_90a, from ``ptxas -v``."""
    exe = _ptxas()
    if exe is None:
        return None, None
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        out = subprocess.run([exe, f"-arch=sm_{HOPPER.arch}a", "-v", path, "-o", os.devnull], capture_output=True,
                             text=True)
    text = out.stdout + out.stderr
    if out.returncode != 0:
        raise RuntimeError(f"ptxas failed:\n{text[-2000:]}")
    registers = re.search(r"Used (\d+) registers", text)
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", text)]
    return (int(registers.group(1)) if registers else None), (max(spills) if spills else None)


def build(fn, types: dict[str, str], constexprs: dict[str, object], num_warps: int = 4,
          divisible_by_16: tuple[str, ...] = ()) -> Build:
    """Compile ``fn`` (a @triton.jit function) for sm_90. ``types``: Triton type per runtime argument ("*fp32",
    "fp32", "*i64", ...; any not named is "i32"); ``constexprs``: value per tl.constexpr argument.

    A real launch is specialised by the JIT: an integer argument equal to 1 becomes a constant (pass it in
    ``constexprs``), and pointers and integers divisible by 16 are marked so (name them in ``divisible_by_16``),
    which lets loads vectorise -- the register count of the NCE loss kernel halves with it. Build what the launch
    will see, or the figures describe a kernel that never runs."""
    params = list(fn.arg_names)
    unknown = (set(constexprs) | set(divisible_by_16)) - set(params)
    if unknown:
        raise ValueError(f"{fn.__name__} has no argument(s) {sorted(unknown)}")
    signature = {p: "constexpr" if p in constexprs else types.get(p, "i32") for p in params}
    src = ASTSource(fn=fn, signature=signature,
                    constexprs={(params.index(k),): v for k, v in constexprs.items()},
                    attrs={(params.index(p),): [["tt.divisibility", 16]] for p in divisible_by_16})
    kernel = triton.compile(src, target=HOPPER, options={"num_warps": num_warps})
    registers, spilled = ptxas_report(kernel.asm["ptx"])
    return Build(kernel.metadata.shared, registers, spilled)


def build_checked(fn, types: dict[str, str], constexprs: dict[str, object], num_warps: int = 4,
                  divisible_by_16: tuple[str, ...] = (), max_spilled: int = 0) -> Build:
    """``build``, printing the result and failing (AssertionError naming the kernel and its specialisation) when
    it needs more shared memory than a Hopper block has or spills more than ``max_spilled`` bytes."""
    b = build(fn, types, constexprs, num_warps, divisible_by_16)
    what = f"{fn.__name__} {constexprs} x {num_warps} warps"
    print(what, b, flush=True)
    assert b.shared <= SHARED_PER_BLOCK, f"{what}: {b.shared} bytes of shared memory"
    assert (b.spilled or 0) <= max_spilled, f"{what}: {b.spilled} bytes spilled"
    return b
