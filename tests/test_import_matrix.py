"""The checkout's top-level folders never stand in for installed packages: from the repository root, with Hugging
Face's ``kernels`` installed (transformers 5 imports it as soon as a BERT is built), ``import kernels`` is theirs.

Each launch a user has — ``python -m cmc_fast`` from the root, the same from elsewhere, the ``cmc-fast`` console
script, ``torchrun -m cmc_fast`` from the root — trains the tiny synthetic job (a small BERT and a stage-1 step), in
an environment with Hugging Face's ``kernels`` and in one without it: a fresh venv whose site-packages holds every
installed distribution but that one (symlinked, so it costs no install).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TINY_JOB = ["train", "--synthetic-n", "48,16", "--epochs", "1", "--batch-size", "16", "--nce-k", "8", "--max-len", "16",
            "--image-size", "32,32", "--mm-dim", "32", "--chunks", "4", "--rank", "3", "--no-progress",
            "--variant", "cmc-t", "--text-model", "tiny", "--tiny-text-layers", "1", "--image-model", "tiny"]


def _hf_kernels_installed() -> bool:
    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _is_hf_kernels(entry: Path) -> bool:
    name = entry.name.lower()
    return name in ("kernels", "kernels.py") or (name.startswith("kernels-") and name.endswith((".dist-info",
                                                                                              ".egg-info")))


@pytest.fixture(scope="module")
def env_without_hf_kernels(tmp_path_factory) -> Path:
    """A venv seeing every installed distribution except Hugging Face's ``kernels``; returns its bin folder."""
    if not _hf_kernels_installed():
        return BIN
    home = tmp_path_factory.mktemp("no-hf-kernels")
    venv.EnvBuilder(with_pip=False, symlinks=True).create(home)
    bin_dir = home / "bin"
    target = Path(subprocess.check_output([str(bin_dir / "python"), "-c",
                                           "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                          text=True).strip())
    for site in dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]):
        for entry in Path(site).iterdir():
            if not _is_hf_kernels(entry) and not (target / entry.name).exists():
                (target / entry.name).symlink_to(entry)
    for script in ("cmc-fast", "torchrun"):
        installed = BIN / script
        if installed.is_file():
            lines = installed.read_text().splitlines(keepends=True)
            (bin_dir / script).write_text(f"#!{bin_dir / 'python'}\n" + "".join(lines[1:]))
            (bin_dir / script).chmod(0o755)
    return bin_dir


@pytest.fixture(params=["with Hugging Face's kernels", "without Hugging Face's kernels"])
def bin_dir(request) -> Path:
    if request.param.startswith("with "):
        if not _hf_kernels_installed():
            pytest.skip("Hugging Face's kernels is not installed here (transformers < 5 does not require it)")
        return BIN
    return request.getfixturevalue("env_without_hf_kernels")


def _child_env() -> dict[str, str]:
    """The user's environment, where the root is on sys.path only where the launch puts it: PYTHONPATH keeps its
    other entries (CI's run under the oldest pinned releases puts them there)."""
    drop = ("TRITON_INTERPRET", "CMC_FAST_KERNELS", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    kept = [p for p in env.pop("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != ROOT]
    if kept:
        env["PYTHONPATH"] = os.pathsep.join(kept)
    return env


def _run(cmd: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=_child_env(), capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def _require_installed_from_this_checkout(bin_dir: Path, tmp_path: Path) -> None:
    """From elsewhere (and through the console script) only an install finds cmc_fast: it must be this checkout's."""
    proc = _run([str(bin_dir / "python"), "-c", "import cmc_fast, os; print(os.path.realpath(cmc_fast.__file__))"],
                cwd=tmp_path)
    if proc.returncode != 0 or not Path(proc.stdout.strip()).is_relative_to(ROOT):
        pytest.skip(f"cmc_fast is not installed from this checkout (pip install -e {ROOT}): {proc.stdout.strip()}")


def _assert_trained(proc: subprocess.CompletedProcess, run: Path) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((run / "metrics.json").read_text())["results"]
    assert results["cmc-t"]["test"]["n"] > 0, results


@pytest.mark.parametrize("launch", ["python -m from the root", "python -m from elsewhere", "console script"])
def test_each_launch_builds_a_bert_and_trains_the_tiny_job(bin_dir, launch, tmp_path):
    run = tmp_path / "run"
    job = TINY_JOB + ["--data-root", str(tmp_path / "data"), "--out", str(run)]
    if launch == "python -m from the root":
        proc = _run([str(bin_dir / "python"), "-m", "cmc_fast", *job], cwd=ROOT)
    else:
        _require_installed_from_this_checkout(bin_dir, tmp_path)
        if launch == "python -m from elsewhere":
            proc = _run([str(bin_dir / "python"), "-m", "cmc_fast", *job], cwd=tmp_path)
        else:
            if not (bin_dir / "cmc-fast").is_file():
                pytest.skip(f"no cmc-fast console script in {bin_dir}")
            proc = _run([str(bin_dir / "cmc-fast"), *job], cwd=ROOT)
    _assert_trained(proc, run)


def test_from_the_root_kernels_is_the_installed_package_or_an_empty_namespace(bin_dir):
    """``import kernels`` from the root is Hugging Face's where installed; otherwise our folder is only a namespace
    portion (no code runs, transformers reads it as "not installed"), and its op modules refuse a second name."""
    check = """
import importlib.metadata, sys
import kernels
try:
    importlib.metadata.version("kernels")
    print("installed", getattr(kernels, "__file__", None))
except importlib.metadata.PackageNotFoundError:
    print("namespace", getattr(kernels, "__file__", None), list(kernels.__path__))
from cmc_fast import ops
try:
    import kernels.nce
    print("second copy")
except ImportError as e:
    print("refused:", e)
print(sorted(m for m in sys.modules if m.startswith("kernels.nce") or m.startswith("kernels.block")))
"""
    proc = _run([str(bin_dir / "python"), "-c", check], cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    kind, origin, *rest = proc.stdout.splitlines()[0].split(" ", 2)
    if kind == "installed":
        assert origin != "None" and not Path(origin).resolve().is_relative_to(ROOT), origin
    else:
        assert kind == "namespace" and origin == "None", proc.stdout
    assert "second copy" not in proc.stdout
    assert proc.stdout.splitlines()[-1] == "[]", proc.stdout


def test_torchrun_from_the_root_trains_the_tiny_job_on_two_processes(bin_dir, tmp_path):
    torchrun = bin_dir / "torchrun"
    if not torchrun.is_file():
        pytest.skip(f"no torchrun in {bin_dir}")
    run = tmp_path / "run"
    job = TINY_JOB + ["--data-root", str(tmp_path / "data"), "--out", str(run)]
    proc = _run([str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "cmc_fast", *job], cwd=ROOT)
    _assert_trained(proc, run)


def test_the_no_hf_kernels_env_really_lacks_it(env_without_hf_kernels):
    """The environment the 'without' cases run in has no ``kernels`` distribution (else they prove nothing)."""
    proc = _run([str(env_without_hf_kernels / "python"), "-c",
                 "import importlib.util; print(importlib.util.find_spec('kernels'))"], cwd=Path("/"))
    assert proc.returncode == 0 and proc.stdout.strip() == "None", proc.stdout + proc.stderr
