"""Build a Triton kernel for Hopper (sm_90) without a GPU, read what ptxas says of it, and report its static cost.

The interpreter (how the tests run kernels on a CPU) checks neither code generation (libdevice functions, tl.dot's
minimum tiles, types across branches) nor resources. ``build`` compiles one specialisation with Triton's bundled
ptxas and returns its shared memory and, where that ptxas can be found, its registers and spilled bytes.
Code generation does not work under TRITON_INTERPRET=1: call this in a process without it (the tests do).

The static report (``python -m cmc_fast.kernels.hopper_build report --op nce --shape B,D,K,N --bank-dtype fp32
--sass-dir DIR [--json]``) builds every specialisation one launch of an op can run at a shape -- the op module's
``hopper_specs(shape, **options)`` lists them as ``Spec`` objects (see ``REPORTERS``) -- writes each one's SASS
(Triton's bundled cuobjdump) into DIR and prints, per specialisation, registers, spills, shared memory, the grid
against the resident slots of a 132-SM H100/H200, and the hot loop's instruction mix per gathered row. Nothing here
runs a kernel: these are counts of the code, not times.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

HOPPER = GPUTarget("cuda", 90, 32)
SHARED_PER_BLOCK = 227 * 1024  # the most shared memory one block may use on an H100/H200

# Resident-block limits of one sm_90 SM (CUDA C Programming Guide, "Compute Capabilities", table of technical
# specifications for compute capability 9.0): they bound how many programs run at once, hence the waves.
HOPPER_SMS = 132  # H100 SXM and H200 (NVIDIA H100/H200 datasheets): 132 SMs
REGISTERS_PER_SM = 65536
REGISTER_ALLOC_UNIT = 256  # registers are allocated per warp in units of 256 (8 per thread)
SHARED_PER_SM = 228 * 1024
SHARED_RESERVED_PER_BLOCK = 1024  # the runtime reserves 1 KB of shared memory per resident block
WARPS_PER_SM = 64
SCHEDULERS_PER_SM = 4  # warp schedulers, each issuing at most one instruction a cycle (H100 whitepaper: 4 SMSPs)
BLOCKS_PER_SM = 32

# Per-GPU bandwidths for floors, bytes/s. Each value names its source; None: not known here (owed to a measurement on
# the device). "measured" values are someone's measurement, not this project's.
GPUS = {
    "H100 SXM": {
        "hbm_spec": 3.35e12,  # NVIDIA H100 datasheet, SXM5 (HBM3): 3.35 TB/s
        "hbm_measured": None,  # owed: no H100 copy measured in this project yet
        "l2_measured": None,  # owed: NVIDIA publishes no L2 bandwidth; measure a gather over an L2-resident bank
    },
    "H200": {
        "hbm_spec": 4.8e12,  # NVIDIA H200 datasheet (HBM3e): 4.8 TB/s
        "hbm_measured": 4.3e12,  # issue #11: a device-to-device copy on an H200 reaches ~4.3 TB/s
        "l2_measured": None,  # owed, as for the H100
    },
}


# The instruction classes of the hot-loop mix (SASS opcodes, the part before the first '.').
MIX_CLASSES = {
    "loads": ("LDG", "LD", "LDS", "LDSM", "LDGSTS", "UTMALDG", "LDGDEPBAR"),
    "stores": ("STG", "ST", "STS", "RED", "ATOM", "ATOMG", "ATOMS"),
    "shuffles": ("SHFL",),
    "barriers": ("BAR", "SYNCS", "MEMBAR", "DEPBAR"),  # block-level; BSSY/BSYNC (warp reconvergence) are "other"
    "mufu": ("MUFU",),
    "fp32": ("FADD", "FMUL", "FFMA", "FMNMX", "FSETP", "FSET", "FSEL", "FCHK", "FRND", "FSWZADD"),
    "tensor": ("HMMA", "HGMMA", "IMMA", "IGMMA", "QGMMA", "BGMMA", "WGMMA"),
}


@dataclass
class Build:
    shared: int  # bytes of shared memory per block
    registers: int | None  # per thread; None when ptxas was not found
    spilled: int | None  # the larger of spill stores and spill loads, bytes; None when ptxas was not found


@dataclass
class Spec:
    """One specialisation one launch at the report's shape can run (what ``hopper_specs`` returns a list of)."""
    kernel: object  # the @triton.jit function
    types: dict[str, str]  # as build(): Triton type per runtime argument
    constexprs: dict[str, object]
    num_warps: int
    divisible_by_16: tuple[str, ...] = ()
    path: str = ""  # shared by the specialisations one launch runs together (e.g. its config)
    programs: int = 0  # the grid at that shape
    rows_per_iteration: int | None = None  # kernels that gather bank rows: rows one program gathers per loop pass
    extra: dict = field(default_factory=dict)  # op-specific report fields (BLOCK adds padding_waste)
    loops: tuple | None = None  # the source loops as Loop trees, outermost first (see executed_mix); None: not counted
    launches: int = 1  # launches of this specialisation in one call of the op (e.g. one forward + backward)
    timing: dict | None = None  # {"sms", "clock_hz", "floor_us"}: issue-bound time and floor (see issue_bound_s)


@dataclass(frozen=True)
class Loop:
    """A loop of a kernel's source, for weighting its SASS by what runs: ``trips`` passes per enclosing pass.
    ``unrollable``: its trip count is a compile-time constant, so the compiler may unroll it (then its copies are
    straight-line code of the enclosing body and it matches no SASS loop)."""
    name: str
    trips: int
    inner: tuple = ()
    unrollable: bool = False


# op -> "module:function" returning list[Spec]; options come from the CLI (NCE: bank_dtype; BLOCK: dtype, precision)
REPORTERS = {"nce": "cmc_fast.kernels.nce:hopper_specs", "block": "cmc_fast.kernels.block:hopper_specs"}


# =========================================================================================== building
def _tool(name: str) -> str | None:
    """Path of a CUDA binary Triton ships (ptxas, cuobjdump, nvdisasm), or None."""
    try:  # Triton >= 3.4
        from triton.backends.nvidia.compiler import get_ptxas
        path = os.path.join(os.path.dirname(get_ptxas(HOPPER.arch).path), name)
    except Exception:  # noqa: BLE001 - older layouts: no register report, the build itself still runs
        return None
    return path if os.path.exists(path) else None


def _ptxas() -> str | None:
    return _tool("ptxas")


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


def compile_sm90(fn, types: dict[str, str], constexprs: dict[str, object], num_warps: int = 4,
                 divisible_by_16: tuple[str, ...] = ()):
    """Compile ``fn`` (a @triton.jit function) for sm_90; returns Triton's compiled kernel (``.asm`` holds ttir,
    ttgir, llir, ptx, cubin). ``types``: Triton type per runtime argument ("*fp32", "fp32", "*i64", ...; any not
    named is "i32"); ``constexprs``: value per tl.constexpr argument.

    A real launch is specialised by the JIT: an integer argument equal to 1 becomes a constant (pass it in
    ``constexprs``), and pointers and integers divisible by 16 are marked so (name them in ``divisible_by_16``),
    which lets loads vectorise -- the register count of the NCE loss kernel halves with it. Build what the launch
    will see, or the figures describe a kernel that never runs."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("hopper_build cannot generate code under TRITON_INTERPRET=1: run it without")
    params = list(fn.arg_names)
    unknown = (set(constexprs) | set(divisible_by_16)) - set(params)
    if unknown:
        raise ValueError(f"{fn.__name__} has no argument(s) {sorted(unknown)}")
    signature = {p: "constexpr" if p in constexprs else types.get(p, "i32") for p in params}
    src = ASTSource(fn=fn, signature=signature,
                    constexprs={(params.index(k),): v for k, v in constexprs.items()},
                    attrs={(params.index(p),): [["tt.divisibility", 16]] for p in divisible_by_16})
    return triton.compile(src, target=HOPPER, options={"num_warps": num_warps})


def build(fn, types: dict[str, str], constexprs: dict[str, object], num_warps: int = 4,
          divisible_by_16: tuple[str, ...] = ()) -> Build:
    """Compile ``fn`` for sm_90 (see ``compile_sm90``) and read its shared memory, registers and spills."""
    kernel = compile_sm90(fn, types, constexprs, num_warps, divisible_by_16)
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


# ================================================================================================ SASS
def sass_text(kernel) -> str:
    """The SASS of a compiled kernel (``compile_sm90``'s result), from Triton's bundled cuobjdump."""
    exe = _tool("cuobjdump")
    if exe is None:
        raise RuntimeError("cuobjdump not found beside Triton's ptxas (triton/backends/nvidia/bin)")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        out = subprocess.run([exe, "-sass", path], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"cuobjdump failed:\n{out.stderr[-2000:]}")
    return out.stdout


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")


def sass_instructions(sass: str) -> list[tuple[int, str]]:
    """(address, instruction text without predicate) for every instruction of a cuobjdump listing."""
    out = []
    for m in _SASS_LINE.finditer(sass):
        text = re.sub(r"^@!?U?P[T0-9]+\s+", "", m.group(2))
        out.append((int(m.group(1), 16), text))
    return out


def hot_loop(instructions: list[tuple[int, str]]) -> list[str]:
    """The instructions of the hot loop: of the loops closed by a backward branch (``BRA`` to a lower address),
    those that contain no other loop (innermost), the one with the most instructions. Every warp of a program runs
    each of them once per pass. Empty when the kernel has no loop."""
    loops = []
    for addr, text in instructions:
        m = re.match(r"BRA(?:\.\S+)?\s+(?:`\(\.L_x_\d+\)\s*)?0x([0-9a-f]+)", text)
        if m and int(m.group(1), 16) < addr:
            loops.append((int(m.group(1), 16), addr))
    innermost = [(s, e) for s, e in loops if not any((s2, e2) != (s, e) and s <= s2 and e2 <= e for s2, e2 in loops)]
    if not innermost:
        return []
    body = [[t for a, t in instructions if s <= a <= e] for s, e in innermost]
    return max(body, key=len)


# ------------------------------------------------------------------------------------- loops weighted by trips
_BACK_BRANCH = re.compile(r"BRA(?:\.\S+)?\s+(?:`\(\.L_x_\d+\)\s*)?0x([0-9a-f]+)")


def sass_loops(instructions: list[tuple[int, str]]) -> list[dict]:
    """The loops of a listing as a tree: every backward branch closes a loop [target, branch]; one loop holds
    another when its range contains it. Each node: {"start", "end", "inner": [...]}, in address order. Several
    backward branches to one target (a loop with a ``continue``) are one loop, the last branch closing it."""
    ends: dict[int, int] = {}
    for addr, text in instructions:
        m = _BACK_BRANCH.match(text)
        if m and int(m.group(1), 16) < addr:
            start = int(m.group(1), 16)
            ends[start] = max(addr, ends.get(start, 0))
    roots: list[dict] = []
    stack: list[dict] = []
    for start, end in sorted(ends.items(), key=lambda se: (se[0], -se[1])):
        node = {"start": start, "end": end, "inner": []}
        while stack and not (stack[-1]["start"] <= start and end <= stack[-1]["end"]):
            stack.pop()
        (stack[-1]["inner"] if stack else roots).append(node)
        stack.append(node)
    return roots


def _match_loops(found: list[dict], declared: tuple, where: str) -> list[tuple[dict, Loop]]:
    """Pair SASS loops with declared source loops level by level, in order; declared ``unrollable`` loops the
    compiler unrolled match nothing. A structure that does not match is an error naming the kernel: counting
    the wrong trips would report a figure for code that does not run."""
    kept = list(declared)
    if len(found) != len(kept):
        kept = [d for d in declared if not d.unrollable]
    if len(found) != len(kept):
        raise ValueError(f"{where}: the SASS has {len(found)} loops at this level, the source declares "
                         f"{[d.name for d in declared]} ({len(kept)} not unrollable): declare the spec's loops anew")
    pairs = []
    for node, loop in zip(found, kept):
        pairs.append((node, loop))
        pairs += _match_loops(node["inner"], loop.inner, f"{where}/{loop.name}")
    return pairs


def executed_mix(instructions: list[tuple[int, str]], loops: tuple, where: str = "kernel") -> dict:
    """The instruction mix one warp of one program executes: every instruction weighted by the product of the trip
    counts of the loops around it (``loops``: the source's loop trees, see ``Loop``). Both sides of a branch count
    (an upper bound where a branch skips code, e.g. the last tile of a shorter chunk); an unrolled loop's copies
    count once per enclosing pass, as written. Adds ``loops``: name -> instructions in one pass of its body."""
    pairs = _match_loops(sass_loops(instructions), loops, where)
    weights = [1] * len(instructions)
    body = {}
    for node, loop in pairs:
        inside = [i for i, (a, _) in enumerate(instructions) if node["start"] <= a <= node["end"]]
        body[loop.name] = len(inside)
        for i in inside:
            weights[i] *= loop.trips
    mix = dict.fromkeys(MIX_CLASSES, 0)
    mix["other"] = 0
    for (_, text), w in zip(instructions, weights):
        mix[_mix_class(text)] += w
    mix["total"] = sum(weights)
    mix["loops"] = body
    return mix


def issue_bound_s(instructions_per_warp: int, num_warps: int, programs: int, sms: int, clock_hz: float) -> float:
    """Seconds one launch takes at best if every warp scheduler issues one instruction a cycle (4 per sm_90 SM) and
    nothing else limits it: the busiest SM runs ceil(programs / sms) programs, their warps spread over its 4
    schedulers. A lower bound on the launch (latency, the tensor pipe and memory can only add), not a prediction."""
    per_sm = -(-programs // sms) * num_warps
    return -(-per_sm // SCHEDULERS_PER_SM) * instructions_per_warp / clock_hz


_LAYOUT = re.compile(r"^(#[\w]+) = #ttg\.(nvidia_mma|blocked)<\{(.*)\}>", re.M)
_DOT = re.compile(r"(?:tt\.dot|ttng\.warp_group_dot)\b.*->\s*tensor<(\d+)x(\d+)x\w+,\s*(#\w+)>")


def _layout_field(body: str, name: str) -> list[int]:
    m = re.search(name + r" = \[([\d, ]+)\]", body)
    return [int(v) for v in m.group(1).split(",")] if m else []


def dot_replication(ttgir: str) -> list[dict]:
    """Every dot of a kernel (Triton GPU IR) with its result tile, warps and how many times its warps compute each
    element: coverage / tile per dimension, from the layout (MMA: warpsPerCTA x instrShape; FMA dots, blocked:
    sizePerThread x threadsPerWarp x warpsPerCTA). ``replication`` > 1: warps computing the same tile twice or
    more (e.g. 8 warps stacked over 16 rows)."""
    layouts = {}
    for name, kind, body in _LAYOUT.findall(ttgir):
        warps = _layout_field(body, "warpsPerCTA")
        if kind == "nvidia_mma":
            per_warp = _layout_field(body, "instrShape")[:2]
        else:
            per_warp = [a * b for a, b in zip(_layout_field(body, "sizePerThread"),
                                              _layout_field(body, "threadsPerWarp"))]
        layouts[name] = (kind, [w * p for w, p in zip(warps, per_warp)], warps)
    dots = []
    for m, n, layout in _DOT.findall(ttgir):
        kind, coverage, warps = layouts.get(layout, ("?", [0, 0], []))
        shape = (int(m), int(n))
        rep = 1
        for size, cover in zip(shape, coverage):
            rep *= max(1, cover // size)
        dots.append({"tile": list(shape), "layout": kind, "warps": warps, "replication": rep})
    return dots


def _mix_class(text: str) -> str:
    op = text.split()[0].split(".")[0] if text else ""
    return next((c for c, ops in MIX_CLASSES.items() if op in ops), "other")


def instruction_mix(instructions: list[str]) -> dict[str, int]:
    """Counts per class of ``MIX_CLASSES`` plus ``other`` (integer, moves, conversions, branches) and ``total``."""
    mix = dict.fromkeys(MIX_CLASSES, 0)
    other = 0
    for text in instructions:
        op = text.split()[0].split(".")[0] if text else ""
        cls = next((c for c, ops in MIX_CLASSES.items() if op in ops), None)
        if cls is None:
            other += 1
        else:
            mix[cls] += 1
    mix["other"] = other
    mix["total"] = len(instructions)
    return mix


# ============================================================================================== waves
def resident_blocks(registers: int | None, shared: int, num_warps: int) -> int:
    """Blocks one sm_90 SM holds at once, limited by registers, shared memory, warps and blocks."""
    limits = [BLOCKS_PER_SM, WARPS_PER_SM // num_warps]
    if registers:
        per_warp = -(-registers * 32 // REGISTER_ALLOC_UNIT) * REGISTER_ALLOC_UNIT
        limits.append(REGISTERS_PER_SM // (per_warp * num_warps))
    limits.append(SHARED_PER_SM // (shared + SHARED_RESERVED_PER_BLOCK))
    return max(0, min(limits))


def waves(programs: int, slots: int) -> tuple[float, float]:
    """(programs / slots, how full the last wave is in [0, 1]); slots = SMs x resident blocks per SM."""
    if programs <= 0 or slots <= 0:
        return 0.0, 1.0
    full, rest = divmod(programs, slots)
    return programs / slots, (rest / slots if rest else 1.0)


# ============================================================================================= report
def report_spec(spec: Spec, sass_dir: str, index: int) -> dict:
    """Build one specialisation, write its SASS into ``sass_dir`` and return its report row."""
    kernel = compile_sm90(spec.kernel, spec.types, spec.constexprs, spec.num_warps, spec.divisible_by_16)
    registers, spilled = ptxas_report(kernel.asm["ptx"])
    sass = sass_text(kernel)
    name = spec.kernel.__name__
    os.makedirs(sass_dir, exist_ok=True)
    sass_file = os.path.join(sass_dir, f"{index:02d}_{name}_{spec.num_warps}w.sass")
    with open(sass_file, "w") as f:
        f.write(sass)
    loop = hot_loop(sass_instructions(sass))
    mix = instruction_mix(loop)
    slots = HOPPER_SMS * resident_blocks(registers, kernel.metadata.shared, spec.num_warps)
    n_waves, last_fill = waves(spec.programs, slots)
    row = {"kernel": name, "path": spec.path, "num_warps": spec.num_warps, "sass": sass_file,
           "constexprs": {k: v for k, v in spec.constexprs.items()}, "registers": registers, "spilled": spilled,
           "shared": kernel.metadata.shared, "programs": spec.programs, "resident_slots": slots,
           "waves": round(n_waves, 3), "last_wave_fill": round(last_fill, 3),
           "rows_per_iteration": spec.rows_per_iteration, "loop_instructions_per_warp": mix,
           "per_gathered_row": None}
    if spec.rows_per_iteration and loop:
        # warp-instructions the SM issues per gathered row: every warp runs the loop body once per pass
        row["per_gathered_row"] = {k: round(v * spec.num_warps / spec.rows_per_iteration, 2) for k, v in mix.items()}
    row.update(spec.extra)
    if spec.loops is not None:
        row.update(executed_row(spec, sass_instructions(sass), kernel.asm.get("ttgir")))
    return row


def executed_row(spec: Spec, instructions: list[tuple[int, str]], ttgir: str | None = None) -> dict:
    """Report fields of what one launch of ``spec`` executes (its declared ``loops`` weighted by their trips):
    the mix per warp and program, each dot's warp replication (``dot_replication``, from the Triton GPU IR) and,
    where ``spec.timing`` gives the GPU, the issue-bound time of its
    ``launches`` in one call beside their floor (``issue_bound_us``, ``floor_us``, both for all launches)."""
    mix = executed_mix(instructions, spec.loops, spec.kernel.__name__)
    row = {"executed_per_warp": mix, "launches": spec.launches}
    if ttgir is not None:
        dots = dot_replication(ttgir)
        row.update(dots=dots, dot_replication=max((d["replication"] for d in dots), default=1))
    if spec.timing:
        t = spec.timing
        once = issue_bound_s(mix["total"], spec.num_warps, spec.programs, t["sms"], t["clock_hz"])
        row.update(issue_bound_us_per_launch=round(1e6 * once, 3), issue_bound_us=round(1e6 * once * spec.launches, 3),
                   floor_us=round(t["floor_us"] * spec.launches, 3), timing_gpu=t.get("gpu"))
    return row


def load_reporter(op: str):
    """The ``hopper_specs`` function of ``op`` (ImportError/AttributeError when its module does not provide it)."""
    if op not in REPORTERS:
        raise ValueError(f"--op must be one of {sorted(REPORTERS)}, got {op!r}")
    module, func = REPORTERS[op].split(":")
    return getattr(importlib.import_module(module), func)


def report(op: str, shape: tuple[int, ...], sass_dir: str, **options) -> list[dict]:
    os.makedirs(sass_dir, exist_ok=True)
    specs = load_reporter(op)(shape, **options)
    return [report_spec(s, sass_dir, i) for i, s in enumerate(specs)]


_COLUMNS = [("kernel", 24), ("path", 22), ("num_warps", 5), ("registers", 5), ("spilled", 5), ("shared", 6),
            ("programs", 8), ("waves", 6), ("last_wave_fill", 5), ("rows_per_iteration", 5)]
_MIX_COLUMNS = ["total", "loads", "shuffles", "barriers", "mufu", "fp32", "tensor"]


def format_table(rows: list[dict]) -> str:
    """A plain-text table; the instruction mix is per gathered row where the kernel gathers rows, else per warp
    and pass (``loop/warp``)."""
    head = ["kernel", "path", "warps", "regs", "spill", "shared", "programs", "waves", "last", "rows",
            "mix"] + _MIX_COLUMNS
    lines = [" | ".join(head)]
    for r in rows:
        cells = [str(r.get(k)) for k, _ in _COLUMNS]
        per_row = r.get("per_gathered_row")
        mix = per_row or r["loop_instructions_per_warp"]
        cells.append("per row" if per_row else "loop/warp")
        cells += [str(mix.get(k)) for k in _MIX_COLUMNS]
        lines.append(" | ".join(cells))
    return "\n".join(lines) + format_bounds(rows)


def format_bounds(rows: list[dict]) -> str:
    """Rows with declared loops: instructions one warp executes (loops weighted by their trips), the issue bound
    of the kernel's launches in one call beside their floor, and the totals of the call."""
    timed = [r for r in rows if "executed_per_warp" in r]
    if not timed:
        return ""
    lines = ["", "executed per warp (loops x trips) | launches | issue bound us | floor us | loop bodies"]
    for r in timed:
        lines.append(f"{r['kernel']}: {r['executed_per_warp']['total']} | {r['launches']} | "
                     f"{r.get('issue_bound_us')} | {r.get('floor_us')} | {r['executed_per_warp']['loops']}")
    if all("issue_bound_us" in r for r in timed):
        bound, floor = (round(sum(r[k] for r in timed), 3) for k in ("issue_bound_us", "floor_us"))
        lines.append(f"one call: issue bound {bound} us, floor {floor} us ({timed[0].get('timing_gpu')})")
    return "\n".join(lines)


def _parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shape must be comma-separated integers, got {text!r}") from None
    if any(x < 0 for x in shape):
        raise argparse.ArgumentTypeError(f"--shape must be non-negative, got {text!r}")
    return shape


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cmc_fast.kernels.hopper_build",
                                     description="Static sm_90 cost report of a Triton op (no GPU needed)")
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("report", help="build every specialisation a launch at --shape runs; SASS + table")
    rep.add_argument("--op", required=True, choices=sorted(REPORTERS))
    rep.add_argument("--shape", required=True, type=_parse_shape, help="e.g. B,D,K,N for nce")
    rep.add_argument("--sass-dir", required=True, help="directory the SASS files are written to")
    rep.add_argument("--json", action="store_true", help="print a JSON list, one object per specialisation")
    rep.add_argument("--bank-dtype", choices=["fp32", "bf16", "fp16"], help="nce: the bank's dtype")
    rep.add_argument("--nce-path", choices=["gather", "dense"], help="nce: the form of the loss (default gather)")
    rep.add_argument("--dtype", help="block: the operands' dtype")
    rep.add_argument("--precision", help="block: the matmul precision")
    rep.add_argument("--gpu", help="block: the GPU of the issue bound and floors (a key of block_plan.GPUS)")
    args = parser.parse_args(argv)
    options = {k: v for k, v in (("bank_dtype", args.bank_dtype), ("nce_path", args.nce_path), ("dtype", args.dtype),
                                 ("precision", args.precision), ("gpu", args.gpu)) if v is not None}
    try:
        load_reporter(args.op)
    except (ImportError, AttributeError) as e:  # e.g. block before its branch is merged: this op only
        print(f"op {args.op!r} has no report here: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    rows = report(args.op, args.shape, args.sass_dir, **options)
    floors = _floors(args.op, args.shape, options)
    if args.json:
        print(json.dumps(rows, indent=1, default=str))  # default: constexprs such as Triton dtypes
    else:
        print(format_table(rows))
        if floors:
            print("\nfloors:\n" + "\n".join(f"  {k}: {v}" for k, v in floors.items()))
    return 0


def _floors(op: str, shape: tuple[int, ...], options: dict) -> dict | None:
    """The op module's optional ``hopper_floors(shape, **options)`` (a dict of named floors), or None."""
    module = importlib.import_module(REPORTERS[op].split(":")[0])
    fn = getattr(module, "hopper_floors", None)
    return fn(shape, **options) if fn else None


if __name__ == "__main__":
    sys.exit(main())
