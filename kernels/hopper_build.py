"""Build a Triton kernel for Hopper (sm_90) without a GPU, read what ptxas says of it, and count its static cost.

The interpreter (how the tests run kernels on a CPU) checks neither code generation (libdevice functions, tl.dot's
minimum tiles, types across branches) nor resources. ``build`` compiles one specialisation with Triton's bundled
ptxas and returns its shared memory and, where that ptxas can be found, its registers and spilled bytes.
Code generation does not work under TRITON_INTERPRET=1: call this in a process without it (the tests do).

``report_spec`` builds one ``Spec`` (a specialisation one launch of an op runs at a shape: the per-op lists are
``kernels/nce_sm90.py`` and ``kernels/block_sm90.py``), writes its SASS (Triton's bundled cuobjdump) and returns
its row: registers, spills, shared memory, the grid against the resident slots of a 132-SM H100/H200, the hot
loop's instruction mix and, where the spec declares its loops, what one warp executes. The command line is
``python -m cmc_fast.kernels.sm90_report``. Nothing here runs a kernel: these are counts of the code, not times.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from .gpus import HOPPER_SMS, issue_bound_s, resident_blocks

HOPPER = GPUTarget("cuda", 90, 32)
SHARED_PER_BLOCK = 227 * 1024  # the most shared memory one block may use on an H100/H200

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
    count once per enclosing pass, as written. Adds ``loops``: name -> instructions in one pass of its body, and
    ``loop_loads``: name -> its passes per program (``runs``) and the global loads and asynchronous copies of its
    own body (inner loops not included) by opcode with width (LDG.E, LDG.E.128, LDGSTS.E.BYPASS.128, ...)."""
    pairs = _match_loops(sass_loops(instructions), loops, where)
    weights = [1] * len(instructions)
    body, loads, owner = {}, {}, [None] * len(instructions)
    for node, loop in pairs:  # outermost first: an inner loop's instructions end up owned by the inner loop
        inside = [i for i, (a, _) in enumerate(instructions) if node["start"] <= a <= node["end"]]
        body[loop.name] = len(inside)
        loads[loop.name] = {"runs": weights[inside[0]] * loop.trips if inside else 0}
        for i in inside:
            weights[i] *= loop.trips
            owner[i] = loop.name
    for (_, text), name in zip(instructions, owner):
        op = text.split()[0] if text else ""
        if name is not None and op.split(".")[0] in ("LDG", "LDGSTS"):
            loads[name][op] = loads[name].get(op, 0) + 1
    mix = dict.fromkeys(MIX_CLASSES, 0)
    mix["other"] = 0
    for (_, text), w in zip(instructions, weights):
        mix[_mix_class(text)] += w
    mix["total"] = sum(weights)
    mix["loops"] = body
    mix["loop_loads"] = loads
    return mix


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
