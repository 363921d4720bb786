"""scripts/gpu_stage.py: the DALI bundle is cut into parts, checked, and unpacked without touching installed
packages (on fresh random files; the real bundle needs PyPI and is exercised by the GPU session)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest

_SPEC = importlib.util.spec_from_file_location(
    "gpu_stage", Path(__file__).resolve().parent.parent / "scripts" / "gpu_stage.py")
gpu_stage = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(gpu_stage)


def _distribution(site: Path, name: str, version: str, files: dict[str, bytes]) -> None:
    """A minimal installed distribution: its files plus a dist-info with METADATA and RECORD."""
    info = site / f"{name}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    record = [f"{rel},," for rel in files] + [f"{info.name}/METADATA,,", f"{info.name}/RECORD,,"]
    (info / "RECORD").write_text("\n".join(record) + "\n")
    for rel, data in files.items():
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / rel).write_bytes(data)


@pytest.fixture
def staged(tmp_path):
    """A bundle of three distributions, two sharing the ``nvidia`` folder, in parts of at most 40 kB."""
    rng = np.random.default_rng(int.from_bytes(os.urandom(4), "little"))
    blob = lambda n: rng.integers(0, 256, size=n, dtype=np.uint8).tobytes()  # incompressible: several parts
    files = {"dalilike": {"nvidia/dalilike/__init__.py": b"VERSION = '9.9'\n",
                          "nvidia/dalilike/libops.so": blob(70_000)},
             "codec": {"nvidia/codec/__init__.py": b"", "nvidia/codec/libcodec.so": blob(30_000)},
             "helper": {"helper/__init__.py": b"NEW = True\n", "helper/extra.py": b"x = 1\n"}}
    site = tmp_path / "site"
    for name, version in (("dalilike", "9.9"), ("codec", "1.2"), ("helper", "2.0")):
        _distribution(site, name, version, files[name])
    out = tmp_path / "carry"
    out.mkdir()
    manifest = gpu_stage.write_bundle(site, out, 40_000, {"python": "3.12", "wheels": list(files)})
    return out, manifest, files


def test_bundle_roundtrip_keeps_installed_distributions_whole(staged, tmp_path):
    out, manifest, files = staged
    assert len(manifest["parts"]) >= 3 and all(p["bytes"] <= 40_000 for p in manifest["parts"])
    target = tmp_path / "target"
    # the image already has: another version of "helper" (kept whole), and a file the bundle also ships
    _distribution(target, "helper", "1.0", {"helper/__init__.py": b"OLD = True\n"})
    (target / "nvidia").mkdir()
    (target / "nvidia" / "codec").mkdir()
    (target / "nvidia" / "codec" / "__init__.py").write_bytes(b"# the image's\n")

    added, kept = gpu_stage.unpack_bundle(out, target, python="3.12")

    assert kept == ["helper 1.0 (bundle: 2.0)"]
    assert (target / "helper" / "__init__.py").read_bytes() == b"OLD = True\n"
    assert not (target / "helper" / "extra.py").exists() and not (target / "helper-2.0.dist-info").exists()
    assert (target / "nvidia" / "codec" / "__init__.py").read_bytes() == b"# the image's\n"
    for name in ("dalilike", "codec"):
        for rel, data in files[name].items():
            if rel != "nvidia/codec/__init__.py":
                assert (target / rel).read_bytes() == data, rel
    assert added == 4 + 3  # dalilike: 2 files + METADATA + RECORD; codec: the same less the image's __init__


@pytest.mark.parametrize("fault", ["missing", "damaged", "python"])
def test_bundle_refuses_incomplete_or_foreign(staged, tmp_path, fault):
    out, manifest, _ = staged
    part = out / manifest["parts"][1]["name"]
    python = "3.12"
    if fault == "missing":
        part.unlink()
    elif fault == "damaged":
        data = bytearray(part.read_bytes())
        data[len(data) // 2] ^= 0xFF
        part.write_bytes(bytes(data))
    else:
        python = "3.11"
    with pytest.raises(gpu_stage.BundleError, match={"missing": "part-01 missing", "damaged": "part-01 damaged",
                                                    "python": "for Python 3.12, this is 3.11"}[fault]):
        gpu_stage.unpack_bundle(out, tmp_path / "target", python=python)
    assert not (tmp_path / "target").exists() or not any((tmp_path / "target").iterdir())


def test_keep_prunes_other_pythons_and_tools():
    assert gpu_stage._keep("nvidia/dali/backend_impl.cpython-312-x86_64-linux-gnu.so", "312")
    assert not gpu_stage._keep("nvidia/dali/backend_impl.cpython-311-x86_64-linux-gnu.so", "312")
    assert not gpu_stage._keep("nvidia/dali/backend_impl.cpython-313t-x86_64-linux-gnu.so", "313")
    assert gpu_stage._keep("nvidia/dali/libdali.so", "312")
    assert not gpu_stage._keep("nvidia_dali_cuda130-2.4.0.data/scripts/rec2idx.py", "312")
    assert not gpu_stage._keep("nvidia/libnvcomp/bin/nvlzcat", "312")


def test_plan_is_one_gpu_check_then_optional_dali(staged, tmp_path):
    """The one GPU check comes first, with the data; the DALI parts follow one per call, the last running the optional
    DALI command; no call carries two parts (a call carries at most 64 MiB)."""
    out, manifest, _ = staged
    calls = gpu_stage.device_calls(out)
    assert calls[0] == ([], "bash scripts/gpu_check.sh", gpu_stage.MAIN_TIMEOUT_S)
    (out / "weibo").mkdir()
    calls = gpu_stage.device_calls(out)
    assert calls[0] == ([f"{out}/weibo"], "bash scripts/gpu_check.sh", gpu_stage.MAIN_TIMEOUT_S)
    assert gpu_stage.MAIN_TIMEOUT_S <= 600
    parts = [c[0] for c in calls[1:]]
    assert [p for carry in parts for p in carry if "part" in p] == [f"{out}/{p['name']}" for p in manifest["parts"]]
    assert all(sum("part" in p for p in carry) == 1 for carry in parts)
    assert calls[-1][1] == "bash scripts/gpu_check.sh dali"
    assert all(cmd != "bash scripts/gpu_check.sh dali" for _, cmd, _ in calls[:-1])
    assert gpu_stage.device_calls(tmp_path / "nothing") == [([], "bash scripts/gpu_check.sh",
                                                              gpu_stage.MAIN_TIMEOUT_S)]
