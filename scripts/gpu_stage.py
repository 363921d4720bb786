"""Bring what a lent GPU machine lacks (the real Weibo JPEGs; optionally NVIDIA DALI) in calls of at most 64 MiB.

The one GPU command is ``bash scripts/gpu_check.sh`` (scripts/gpu_check.py). It needs only the Weibo folder
(~35 MB), carried with it as ``.gpu_carry/weibo``::

    python scripts/gpu_stage.py stage --no-dali     # copies ../shared/data/weibo to .gpu_carry/ (git-ignored)
    python scripts/gpu_stage.py plan                # prints the device call(s), each with its ``carry`` list

DALI on the GPU is a second, optional command: the GPU image has torch, torchvision and nvJPEG but no DALI, and
DALI's wheel alone is 190 MB, so it goes as a compressed bundle cut into parts, one part per call, to the same warm
machine (the machine keeps ignored files between calls only while it stays warm: 30 s after a call), and
``bash scripts/gpu_check.sh dali`` installs it once every part has arrived, or says DALI-GPU is owed. Staging it
(a few minutes: downloads ~270 MB from PyPI and compresses it)::

    python scripts/gpu_stage.py stage               # the data and the DALI bundle
    python scripts/gpu_stage.py install             # there (gpu_check.sh dali calls it): joins the parts, checks
                                                    # their sha256, unpacks into site-packages

The bundle holds the wheels pip resolves for the GPU image's Python (DALI and its dependencies, less those the
image already has), unpacked, pruned of extension modules for other Python versions and of nvCOMP's command-line
tools and headers, as one tar.xz. Unpacking into site-packages never replaces a file that is already there, so
the image's own packages (numpy, the CUDA libraries torch uses) stay as they are.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import lzma
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CARRY = ROOT / ".gpu_carry"
MANIFEST = "dali.manifest.json"
# What the GPU image already has (device tool, KINDS.md package list, 2026-11-17): not carried.
ON_GPU_IMAGE = {"numpy", "packaging", "six", "pyyaml", "typing-extensions", "wheel"}
# A call carries the working tree (~1 MB) plus its carried paths, 64 MiB in all.
PART_MIB = 58
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64", "any"]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _dist_name(wheel: Path) -> str:
    return re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower()


def _keep(member: str, python_tag: str) -> bool:
    """Extension modules for other Pythons, wheel .data folders and nvCOMP's tools and headers are not needed."""
    ext = re.search(r"\.cpython-(\d+t?)-", member)
    if ext and ext.group(1) != python_tag:
        return False
    first = member.split("/", 1)[0]
    if first.endswith(".data"):
        return False
    return not member.startswith(("nvidia/libnvcomp/bin/", "nvidia/libnvcomp/include/"))


def stage(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.data:
        _stage_data(Path(args.data), out / "weibo")
    if args.no_dali:
        return
    python_tag = args.python.replace(".", "")
    with tempfile.TemporaryDirectory(prefix="cmc-gpu-stage-") as tmp:
        wheels, unpacked = Path(tmp, "wheels"), Path(tmp, "site")
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:", "--python-version",
               args.python, "--implementation", "cp", "--dest", str(wheels)]
        cmd += [arg for p in PLATFORMS for arg in ("--platform", p)] + [args.dali]
        print("downloading:", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        packages = []
        for wheel in sorted(wheels.glob("*.whl")):
            if _dist_name(wheel) in ON_GPU_IMAGE:
                continue
            packages.append(wheel.name)
            with zipfile.ZipFile(wheel) as zf:
                for info in zf.infolist():
                    if not info.is_dir() and _keep(info.filename, python_tag):
                        zf.extract(info, unpacked)
        print(f"compressing {sum(f.stat().st_size for f in unpacked.rglob('*') if f.is_file()) / 2**20:.0f} MiB "
              f"of {len(packages)} wheels", flush=True)
        manifest = write_bundle(unpacked, out, args.part_mib << 20,
                                {"python": args.python, "requirement": args.dali, "wheels": packages})
    print(f"{len(manifest['parts'])} parts, {manifest['bytes'] / 2**20:.0f} MiB, in {out}")
    plan(args)


def write_bundle(site: Path, out: Path, part_bytes: int, info: dict) -> dict:
    """``site``'s files as one tar.xz cut into ``out/dali.part-NN`` of at most ``part_bytes``, and the manifest
    (each part's size and sha256: checked parts make a checked whole) as ``out/dali.manifest.json``; returns the
    manifest."""
    with tempfile.TemporaryDirectory(prefix="cmc-gpu-bundle-") as tmp:
        plain, bundle = Path(tmp, "dali.tar"), Path(tmp, "dali.tar.xz")
        with tarfile.open(plain, "w") as tar:
            for path in sorted(site.rglob("*")):
                if path.is_file():
                    tar.add(path, arcname=str(path.relative_to(site)), recursive=False)
        if shutil.which("xz"):  # multi-threaded, and its output is also decompressed in parallel by xz -T0
            subprocess.run(["xz", "-6", "-T0", "--force", str(plain)], check=True)
        else:
            with open(plain, "rb") as src, lzma.open(bundle, "wb", preset=6) as dst:
                shutil.copyfileobj(src, dst, 1 << 22)
        for old in out.glob("dali.part-*"):
            old.unlink()
        parts = []
        with open(bundle, "rb") as f:
            while block := f.read(part_bytes):
                part = out / f"dali.part-{len(parts):02d}"
                part.write_bytes(block)
                parts.append({"name": part.name, "bytes": len(block), "sha256": hashlib.sha256(block).hexdigest()})
        manifest = {**info, "bytes": bundle.stat().st_size, "parts": parts}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _stage_data(source: Path, dest: Path) -> None:
    """The Weibo folder (tweets and the public images, ~35 MB): the real-data tests and the image benchmark."""
    if not source.is_dir():
        raise SystemExit(f"--data {source}: no such folder (the Weibo folder of ../shared/data)")
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(source, dest)
    for folder in [dest, *(p for p in dest.rglob("*") if p.is_dir())]:  # a read-only source stays restageable
        folder.chmod(folder.stat().st_mode | 0o700)
    size = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    print(f"copied {source} -> {dest} ({size / 2**20:.0f} MiB)")


MAIN_TIMEOUT_S = 540  # gpu_check.py's 420 s budget + imports and the CUDA context, under the 600 s limit a call has


def device_calls(out: Path) -> list[tuple[list[str], str, int]]:
    """(carry, command, timeout_s) of each device call, in order: the one GPU check first (with the Weibo folder
    when staged); then, only when a DALI bundle is staged, one call per part back to back, the last running the
    optional DALI command (its rows go to $OUT/dali/)."""
    rel = out.relative_to(ROOT) if out.is_absolute() and out.is_relative_to(ROOT) else out
    manifest = json.loads((out / MANIFEST).read_text()) if (out / MANIFEST).exists() else {"parts": []}
    data = [f"{rel}/weibo"] if (out / "weibo").is_dir() else []
    calls = [(data, "bash scripts/gpu_check.sh", MAIN_TIMEOUT_S)]
    parts = [f"{rel}/{part['name']}" for part in manifest["parts"]]
    for i, part in enumerate(parts):
        carry = [part] + ([f"{rel}/{MANIFEST}"] if i == 0 else [])
        last = i == len(parts) - 1
        calls.append((carry, "bash scripts/gpu_check.sh dali" if last else f"ls -l {rel}", 300 if last else 60))
    return calls


def plan(args: argparse.Namespace) -> None:
    calls = device_calls(Path(args.out))
    print("The GPU check, one device call:")
    for i, (carry, command, timeout) in enumerate(calls, 1):
        if i == 2:
            print("Optional, DALI on the GPU, only with device time to spare, back to back (the parts stay on the "
                  "machine only while it is warm, 30 s after a call):")
        print(f"  {i}. run(command={command!r}, carry={json.dumps(carry)}, timeout_s={timeout})")
    print("Each call returns $OUT/gpu-results.{jsonl,md} (the DALI call under dali/): python scripts/gpu_results.py "
          "<folder>/gpu-results.jsonl puts the figures into bench/results/.")


class BundleError(RuntimeError):
    """The staged bundle cannot be installed (not staged, a part missing or damaged, another Python)."""


def install(args: argparse.Namespace) -> int:
    """Returns 0 when DALI imports afterwards, 3 when it cannot be installed (then DALI-GPU is owed)."""
    try:
        added, installed = unpack_bundle(Path(args.out), Path(args.target or sysconfig.get_paths()["purelib"]))
    except BundleError as e:
        print(e)
        return 3
    print(f"unpacked {added} files into {args.target or 'site-packages'}; kept the installed "
          + (", ".join(installed) or "-"))
    check = subprocess.run([sys.executable, "-c", "import nvidia.dali as d; print('nvidia.dali', d.__version__)"],
                           capture_output=True, text=True)
    print(check.stdout.strip() or check.stderr.strip()[-2000:])
    return 0 if check.returncode == 0 else 3


def unpack_bundle(out: Path, target: Path, python: str | None = None) -> tuple[int, list[str]]:
    """Joins and checks the parts in ``out``, unpacks them into ``target`` without replacing any file there, and
    skips whole every distribution ``target`` already has. Returns (files added, distributions kept)."""
    manifest_path = out / MANIFEST
    if not manifest_path.exists():
        raise BundleError(f"no {manifest_path}: DALI was not staged (python scripts/gpu_stage.py stage)")
    manifest = json.loads(manifest_path.read_text())
    bad = []
    for part in manifest["parts"]:
        path = out / part["name"]
        if not path.exists():
            bad.append(f"{part['name']} missing")
        elif path.stat().st_size != part["bytes"] or _sha256(path) != part["sha256"]:
            bad.append(f"{part['name']} damaged")
    if bad:
        raise BundleError("DALI bundle incomplete (" + ", ".join(bad) + "): parts arrive one per call, and are "
                          "lost if the machine goes cold between calls; until all are here DALI-GPU is owed")
    python = python or f"{sys.version_info.major}.{sys.version_info.minor}"
    if python != manifest["python"]:
        raise BundleError(f"the bundle is for Python {manifest['python']}, this is {python}: restage with "
                          f"--python {python}")
    with tempfile.TemporaryDirectory(prefix="cmc-dali-") as tmp:
        bundle = Path(tmp, "dali.tar.xz")
        with open(bundle, "wb") as dst:
            for part in manifest["parts"]:
                with open(out / part["name"], "rb") as src:
                    shutil.copyfileobj(src, dst, 1 << 22)
        if shutil.which("xz"):  # multi-threaded; else tarfile decompresses (one thread)
            subprocess.run(["xz", "-d", "-T0", str(bundle)], check=True)
            bundle = Path(tmp, "dali.tar")
        with tarfile.open(bundle) as tar:
            members = tar.getmembers()
            skip, installed = _installed_distributions(tar, members, target)
            added = 0
            for member in members:
                if member.name in skip or (target / member.name).exists():  # the image's own file wins
                    continue
                if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4: refuse links and paths out of target
                    tar.extract(member, target, filter="data")
                else:
                    tar.extract(member, target)
                added += 1
    return added, installed


def _installed_distributions(tar: tarfile.TarFile, members: list[tarfile.TarInfo], target: Path):
    """The bundle's files of every distribution ``target`` already has (at any version): a package is taken
    whole from the image or whole from the bundle, never mixed file by file."""
    have = {re.sub(r"[-_.]+", "-", d.metadata["Name"]).lower(): d.version
            for d in importlib.metadata.distributions(path=[str(target)])}
    skip, installed = set(), []
    for member in members:
        m = re.fullmatch(r"([^/]+)-([^/-]+)\.dist-info/RECORD", member.name)
        name = m and re.sub(r"[-_.]+", "-", m.group(1)).lower()
        if name and name in have:
            installed.append(f"{name} {have[name]} (bundle: {m.group(2)})")
            record = tar.extractfile(member).read().decode()
            skip.update(row.split(",", 1)[0] for row in record.splitlines() if row)
    return skip, installed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["stage", "plan", "install"])
    parser.add_argument("--out", default=str(CARRY), help="the carried folder (default: .gpu_carry in the repo)")
    parser.add_argument("--python", default="3.12", help="the GPU image's Python (stage)")
    parser.add_argument("--dali", default="nvidia-dali-cuda130==2.4.0", help="the DALI requirement (stage)")
    parser.add_argument("--part-mib", type=int, default=PART_MIB, help="largest part, MiB (stage)")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "weibo"),
                        help="Weibo folder to carry (stage; '' for none)")
    parser.add_argument("--no-dali", action="store_true", help="stage only the data (stage)")
    parser.add_argument("--target", help="where to unpack (install; default: this Python's site-packages)")
    args = parser.parse_args(argv)
    if args.action == "stage":
        stage(args)
        return 0
    if args.action == "plan":
        plan(args)
        return 0
    return install(args)


if __name__ == "__main__":
    sys.exit(main())
