"""How the toolkit installs and imports: its own namespace, and a reference-only path where Triton is missing."""

import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code: str, tmp_path, extra_path: str = "") -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "CMC_FAST_KERNELS")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (extra_path, ROOT) if p)
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_a_top_level_kernels_package_does_not_shadow_ours(tmp_path):
    """Hugging Face's ``kernels`` (used by transformers) is a top-level package: both must live in one environment."""
    other = tmp_path / "site" / "kernels"
    other.mkdir(parents=True)
    (other / "__init__.py").write_text("WHO = 'huggingface'\n")
    out = _run("""
        import kernels
        from cmc_fast import ops
        import cmc_fast.data_pipeline.registry as data
        print(kernels.WHO, ops.nce_loss.__module__, data.__name__)
    """, tmp_path, extra_path=str(tmp_path / "site"))
    assert out.split() == ["huggingface", "cmc_fast.kernels.nce", "cmc_fast.data_pipeline.registry"]


def test_without_triton_every_op_runs_its_reference(tmp_path):
    """Triton installs on Linux only: with ``import triton`` failing, the ops import and compute on the CPU, equal
    to the references called directly."""
    out = _run("""
        import sys
        sys.modules["triton"] = None  # as if not installed: `import triton` raises ImportError
        import torch
        from cmc_fast import ops
        from cmc_fast.kernels import reference as ref
        from cmc_fast.kernels.dispatch import triton_available
        assert sys.modules["triton"] is None and not triton_available()
        g = torch.Generator().manual_seed(0)
        a = torch.nn.functional.normalize(torch.randn(4, 8, generator=g), dim=1).requires_grad_()
        bank = torch.nn.functional.normalize(torch.randn(20, 8, generator=g), dim=1)
        idx = torch.randint(0, 20, (4, 6), generator=g)
        loss = ops.nce_loss(a, bank, idx, tau=0.07, z=3.0, n_data=20)
        want = ref.nce_loss_reference(a, bank, idx, tau=0.07, z=3.0, n_data=20)
        assert torch.allclose(loss, want, rtol=1e-5), (loss, want)
        loss.backward()
        assert a.grad is not None and a.grad.abs().sum() > 0
        sizes, rank = ops.block_chunk_sizes(11, 3), 2
        n_w, n_b = sum(rank * s * s for s in sizes), rank * 11
        args = [torch.randn(n, generator=g) for n in (2 * 11, 2 * 11, n_w, n_b, n_w, n_b)]
        args[0], args[1] = args[0].view(2, 11), args[1].view(2, 11)
        x0 = args[0].requires_grad_()
        out = ops.block_merge(*args, sizes=sizes, rank=rank)
        assert torch.allclose(out, ref.block_merge_reference(*args, sizes=sizes, rank=rank), atol=1e-6)
        out.sum().backward()
        assert x0.grad is not None
        print("ok")
    """, tmp_path)
    assert out.startswith("ok")

