"""Run the Triton kernels in the interpreter on machines without a GPU. This must happen before any
``kernels`` module is imported, which is why it sits at the top of the root conftest."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# The real data: ../shared/data beside the checkout, or CMC_FAST_SHARED_DATA (a GPU machine gets a carried copy).
SHARED_DATA = os.environ.get("CMC_FAST_SHARED_DATA") or os.path.join(os.path.dirname(__file__), "..", "..", "shared",
                                                                      "data")


# Modules whose tests run the Triton kernels, on CPU through the interpreter.
_INTERPRETER_MODULES = ("test_nce_kernel.py", "test_block_kernel.py", "test_fusion.py")


def pytest_collection_modifyitems(config, items):
    """Where Triton's interpreter cannot run the kernels (an old Triton with a new numpy), say so once per test
    instead of failing deep inside the interpreter."""
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return
    from cmc_fast.kernels.dispatch import interpreter_problem

    problem = interpreter_problem()
    if problem:
        for item in items:
            if item.path.name in _INTERPRETER_MODULES:
                item.add_marker(pytest.mark.skip(reason=problem))


@pytest.fixture
def shared_data() -> str:
    path = os.path.abspath(SHARED_DATA)
    if not os.path.isdir(path):
        pytest.skip(f"real data not found at {path} (../shared/data beside the checkout, or CMC_FAST_SHARED_DATA)")
    return path


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Token and image caches go to a per-session temporary directory, never the user's ~/.cache."""
    monkeypatch.setenv("CMC_FAST_CACHE", str(tmp_path_factory.getbasetemp() / "cmc-fast-cache"))


@pytest.fixture(autouse=True)
def _private_cwd(tmp_path, monkeypatch):
    """Each test runs in its own temporary folder: a command without --out writes its default runs/<dataset>-<time>
    there, never into the user's runs/."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def run_without_interpreter():
    """Runs Python code in a child process without TRITON_INTERPRET (code generation, e.g. building kernels for
    sm_90 with ``kernels.hopper_build``, fails in interpreter mode); returns its stdout, fails the test on error."""
    import subprocess
    import sys

    def run(code: str, timeout: int = 600) -> str:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
        proc = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                              timeout=timeout)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc.stdout

    return run
