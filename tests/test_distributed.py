"""Data-parallel training with 2 gloo processes on the CPU (torch.multiprocessing, spawn), against one process.

Each test starts its ranks the way torchrun would (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT in the
environment); the workers write what they saw to files the test compares.
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from tiny import TINY, tiny_config

from cmc_fast import distributed
from cmc_fast.distill import CrossModalNCE
from cmc_fast.loop import batches
from cmc_fast.stages import Batch
from cmc_fast.trainer import build_stage

WORLD = 2
# one step on the same global batch, 2 ranks against 1 process: the same float32 arithmetic on half-batches
# (matmul blocking and the order of the gradient mean differ), so equal up to a few float32 rounding steps
RTOL, ATOL = 1e-4, 1e-5


# --------------------------------------------------------------------------------------------- harness
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_ENTRY = "import sys, test_distributed as t; sys.exit(t.run_worker(*sys.argv[1:]))"


def run_worker(fn_name: str, out: str, args: str) -> int:
    """A rank's entry point (a fresh interpreter, as torchrun starts one): ``fn(rank, out, *args)``."""
    torch.set_num_threads(1)
    faulthandler.enable()
    try:
        return globals()[fn_name](int(os.environ["RANK"]), Path(out), *json.loads(args)) or 0
    finally:
        distributed.shutdown()


def spawn(fn, out: Path, *args, timeout: float = 240) -> list[int | None]:
    """Run ``fn(rank, out, *args)`` in WORLD fresh interpreters started the way torchrun starts its workers
    (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT); their exit codes (None: killed at the timeout). Each rank's
    stderr goes to ``out/stderr-<rank>.txt``."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "WORLD_SIZE": str(WORLD), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "CMC_FAST_DIST_TIMEOUT": "30", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(root), str(root / "tests"), os.environ.get("PYTHONPATH", "")])}
    procs = []
    for r in range(WORLD):
        with open(out / f"stderr-{r}.txt", "w") as err:
            procs.append(subprocess.Popen([sys.executable, "-c", _ENTRY, fn.__name__, str(out), json.dumps(args)],
                                          env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stderr=err,
                                          stdout=subprocess.DEVNULL, cwd=root))
    deadline, codes = time.monotonic() + timeout, []
    for p in procs:
        try:
            codes.append(p.wait(max(0.1, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            codes.append(None)
    return codes


def _fixed_negatives(self: CrossModalNCE, index: torch.Tensor) -> torch.Tensor:
    """Negatives as a function of the anchor's row: the same on 1 or 2 processes (the real ones are per-rank)."""
    offsets = torch.arange(1, self.k + 1, device=index.device) * 17
    return torch.cat([index[:, None], (index[:, None] * 31 + offsets) % self.n_data], dim=1)


# ------------------------------------------------------------------------------- one step, several steps
def _stage1(out: Path):
    cfg = tiny_config(out, tiny_text_dropout=0.0, threads=1)
    return build_stage(cfg, "stage1", run_dir=str(out / "run"))[1]


def _global_batches(stage, count: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return batches(len(stage.train_split), 16, shuffle=True, generator=gen, drop_last=True)[:count]


def _step(stage, rows: torch.Tensor, *, first: bool, augment: bool) -> torch.Tensor:
    split = stage.train_split
    batch = Batch(rows, rows, split.pixels(rows, train=augment, device=stage.device))
    if first:
        stage.on_fit_start(batch)
    return stage.training_step(batch)[0]


def _frozen_batchnorm(stage) -> None:
    """Batch statistics of a half-batch differ from the whole batch's (SyncBatchNorm is CUDA-only): the one-step
    comparison uses the running statistics."""
    stage.train()
    for m in stage.modules["image"].modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()


def _step_record(stage, loss: torch.Tensor) -> dict:
    d = stage.modules["distiller"]
    return {"loss": loss, "z": torch.stack([d.z_v2t, d.z_t2v]),
            "grads": {f"{k}.{n}": p.grad.clone() for k, m in stage.modules.items()
                      for n, p in m.named_parameters() if p.grad is not None},
            "banks": (d.memory_t.clone(), d.memory_v.clone())}


def _steps_worker(rank: int, out: Path) -> int:
    stage = _stage1(out)
    init = torch.load(out / "init.pt", weights_only=True)
    for key, mod in stage.modules.items():
        mod.load_state_dict(init[key])
    wrapped = distributed.wrap(stage)
    rows = _global_batches(stage, 4)
    original = CrossModalNCE.sample_indices
    CrossModalNCE.sample_indices = _fixed_negatives
    _frozen_batchnorm(stage)
    loss = _step(stage, distributed.local_slice(rows[0]), first=True, augment=False)
    record = {"one_step": _step_record(stage, distributed.all_reduce_mean_(loss.clone()))}
    # then three steps as fit runs them: per-rank seeded negatives and flips, BatchNorm on each rank's half
    CrossModalNCE.sample_indices = original
    torch.manual_seed(distributed.epoch_seed(0, "stage1", 0))
    record["negatives"] = stage.modules["distiller"].sample_indices(rows[0])
    stage.train()
    for r in rows[1:]:
        _step(stage, distributed.local_slice(r), first=False, augment=True)
    distributed.unwrap(stage, wrapped)
    d = stage.modules["distiller"]
    record["after"] = {"banks": (d.memory_t, d.memory_v),
                       "params": {f"{k}.{n}": p for k, m in stage.modules.items() for n, p in m.named_parameters()}}
    torch.save(record, out / f"steps-{rank}.pt")
    return 0


def test_two_ranks_step_like_one_process_and_keep_identical_banks(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    stage = _stage1(tmp_path)  # one process; also writes the synthetic data the ranks read
    torch.save({k: m.state_dict() for k, m in stage.modules.items()}, tmp_path / "init.pt")
    monkeypatch.setattr(CrossModalNCE, "sample_indices", _fixed_negatives)
    _frozen_batchnorm(stage)
    single = _step_record(stage, _step(stage, _global_batches(stage, 1)[0], first=True, augment=False))

    assert spawn(_steps_worker, tmp_path) == [0, 0], (tmp_path / "stderr-0.txt").read_text()
    ranks = [torch.load(tmp_path / f"steps-{r}.pt", weights_only=True) for r in range(WORLD)]
    two = ranks[0]["one_step"]
    torch.testing.assert_close(two["z"], single["z"], rtol=RTOL, atol=ATOL)  # Z from the first global batch
    torch.testing.assert_close(two["loss"], single["loss"], rtol=RTOL, atol=ATOL)
    assert two["grads"].keys() == single["grads"].keys() and len(single["grads"]) > 10
    for name, grad in single["grads"].items():
        torch.testing.assert_close(two["grads"][name], grad, rtol=RTOL, atol=ATOL, msg=name)
    for bank_two, bank_one in zip(two["banks"], single["banks"]):  # the gathered update: the whole batch's rows
        torch.testing.assert_close(bank_two, bank_one, rtol=RTOL, atol=ATOL)
    # replicas: bit-identical banks and weights on both ranks after four steps; negatives drawn per rank
    for a, b in zip(ranks[0]["after"]["banks"], ranks[1]["after"]["banks"]):
        assert torch.equal(a, b)
    for name, p in ranks[0]["after"]["params"].items():
        assert torch.equal(p, ranks[1]["after"]["params"][name]), name
    assert not torch.equal(ranks[0]["negatives"], ranks[1]["negatives"])
    assert not torch.equal(ranks[0]["after"]["banks"][0], two["banks"][0])  # the banks did move


# ------------------------------------------------------------------------------------ whole runs, CLI
def _cli_worker(rank: int, out: Path, argv: list[str]) -> int:
    from cmc_fast.cli import main

    return main(argv)


def _results(run: Path, name: str = "metrics.json") -> dict:
    return json.loads((run / name).read_text())


def test_two_rank_run_equals_one_process_run_and_evaluates_the_same(tmp_path):
    from cmc_fast.cli import main
    from cmc_fast.trainer import BASELINE_ROW

    # finetune-t without dropout: nothing random inside a step, no BatchNorm, so 2 ranks compute one process's
    # steps up to float32 rounding and the predictions (argmax) come out the same. cmc (stage 1, then stage 2 on
    # features computed sharded) differs by its per-rank random draws and BatchNorm on half-batches: compared
    # below through evaluation of the same checkpoints.
    argv = ["train", *TINY, "--variant", "finetune-t,cmc", "--epochs", "2", "--tiny-text-dropout", "0",
            "--threads", "1", "--data-root", str(tmp_path / "data")]
    assert main([*argv, "--out", str(tmp_path / "one")]) == 0
    assert spawn(_cli_worker, tmp_path, [*argv, "--out", str(tmp_path / "two")]) == [0, 0], \
        (tmp_path / "stderr-0.txt").read_text()
    one, two = _results(tmp_path / "one"), _results(tmp_path / "two")
    assert two["results"]["finetune-t"]["test"] == one["results"]["finetune-t"]["test"]
    for e1, e2 in zip(one["history"]["finetune-t"], two["history"]["finetune-t"], strict=True):
        assert e2["train_loss"] == pytest.approx(e1["train_loss"], rel=1e-5)
        assert e2["val_accuracy"] == e1["val_accuracy"]
    # the same checkpoints scored by 2 ranks (stage-2 features and predictions sharded, gathered) and by one
    # process: identical metrics for every row
    assert spawn(_cli_worker, tmp_path, ["evaluate", "--run", str(tmp_path / "two")]) == [0, 0]
    two_eval = _results(tmp_path / "two", "evaluate.json")["results"]
    assert main(["evaluate", "--run", str(tmp_path / "two")]) == 0
    one_eval = _results(tmp_path / "two", "evaluate.json")["results"]
    assert set(one_eval) == {"finetune-t", "cmc", BASELINE_ROW}
    assert {v: r["test"] for v, r in two_eval.items()} == {v: r["test"] for v, r in one_eval.items()}


def _dying_worker(rank: int, out: Path, argv: list[str]) -> int:
    """Rank 1 dies (os._exit, as a kill would) when its second epoch of stage 1 starts."""
    from cmc_fast import loop
    from cmc_fast.cli import main

    train_epoch = loop.train_epoch

    def dying_epoch(stage, host_batches, *args, **kwargs):
        if rank == 1 and args[2] == 1:
            os._exit(9)
        return train_epoch(stage, host_batches, *args, **kwargs)

    loop.train_epoch = dying_epoch
    return main(argv)


def test_killed_rank_stops_the_job_in_bounded_time_and_one_process_resumes(tmp_path):
    from cmc_fast.cli import main

    run = tmp_path / "run"
    argv = ["train", *TINY, "--variant", "cmc-t", "--epochs", "2", "--threads", "1", "--bank-dtype", "bfloat16",
            "--data-root", str(tmp_path / "data"), "--out", str(run)]
    # rank 0 ends by itself (1, not None: spawn's hang guard did not have to kill it), its collectives bounded by
    # CMC_FAST_DIST_TIMEOUT; how long that takes is not asserted here
    assert spawn(_dying_worker, tmp_path, argv) == [1, 9]
    err = (tmp_path / "stderr-0.txt").read_text()
    assert "cmc-fast: error: rank 0 of 2: a collective failed" in err and "--resume" in err
    assert "Traceback" not in err
    record = torch.load(run / "checkpoints" / "stage1.last.pt", weights_only=True)
    assert record["epoch"] == 1 and record["modules"]["distiller"]["memory_t"].dtype == torch.bfloat16
    # the 2-rank run's checkpoint, resumed by one process
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    history = _results(run)["history"]["stage1"]
    assert [h["epoch"] for h in history] == [1, 2] and history[0] == record["history"][0]


# ---------------------------------------------------------------------------------------- bfloat16 banks
def test_bfloat16_banks_stay_normalised_and_follow_float32_banks():
    """--bank-dtype bfloat16: the same bank as float32, rounded, and after updates still on the sphere (the update
    mixes and normalises in float32, then rounds once)."""
    labels = torch.randint(0, 2, (300,))
    banks = {}
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(3)
        d = CrossModalNCE(24, 20, labels, proj_dim=32, k=16, bank_dtype=dtype)
        assert d.memory_t.dtype == d.memory_v.dtype == dtype
        torch.manual_seed(4)
        for _ in range(5):
            index = torch.randint(0, 300, (40,))  # repeats included
            d(torch.randn(40, 24), torch.randn(40, 20), index)
        banks[dtype] = d.memory_t.float()
    norms = banks[torch.bfloat16].norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms), rtol=0, atol=2 ** -7)  # bf16: 8 significant bits
    torch.testing.assert_close(banks[torch.bfloat16], banks[torch.float32], rtol=0, atol=2 ** -6)
    assert not torch.equal(banks[torch.bfloat16], banks[torch.float32])
    with pytest.raises(ValueError, match="bank_dtype"):
        CrossModalNCE(24, 20, labels, bank_dtype=torch.float16)


def test_a_global_batch_that_does_not_split_over_the_ranks_is_refused(tmp_path):
    argv = ["train", *TINY, "--variant", "finetune-t", "--batch-size", "15", "--data-root", str(tmp_path / "data"),
            "--out", str(tmp_path / "run")]
    assert spawn(_cli_worker, tmp_path, argv) == [2, 2]
    for r in range(WORLD):
        assert "cmc-fast: error: --batch-size 15: the global batch must split evenly over the 2 processes" in \
            (tmp_path / f"stderr-{r}.txt").read_text()


# ----------------------------------------------------------------------------------- kernel device guard
def test_device_guard_makes_the_tensors_cuda_device_current(monkeypatch):
    """A launcher's first tensor on cuda:1 makes cuda:1 current around the launch (``torch.cuda.device``, patched
    here: no GPU); a CPU tensor (the interpreter) takes no guard."""
    import types

    from cmc_fast.kernels import utils

    entered = []

    @contextlib.contextmanager
    def fake_cuda_device(device):
        entered.append(torch.device(device))
        yield

    monkeypatch.setattr(torch.cuda, "device", fake_cuda_device)

    @utils.on_tensor_device
    def launcher(x, scale: float):
        entered.append(("launch", scale))
        return scale

    on_gpu1 = types.SimpleNamespace(device=torch.device("cuda", 1))  # stands in for a tensor on cuda:1
    assert launcher(on_gpu1, 2.0) == 2.0
    assert entered == [torch.device("cuda", 1), ("launch", 2.0)]
    entered.clear()
    assert launcher(torch.ones(2), scale=3.0) == 3.0
    assert entered == [("launch", 3.0)]


def test_every_triton_launcher_runs_under_its_tensors_device_guard(monkeypatch):
    """The NCE and BLOCK launchers (Triton's interpreter here) each enter ``device_guard`` of their tensors once
    per launch; on a GPU that makes the tensors' device current (previous test)."""
    from cmc_fast.kernels import utils
    from cmc_fast.kernels.dispatch import interpreter_problem, triton_available, triton_interpreted

    from cmc_fast import ops
    from cmc_fast.fusion import Block

    if not (triton_available() and triton_interpreted()) or interpreter_problem():
        pytest.skip("needs Triton's interpreter (TRITON_INTERPRET=1) that runs these kernels")
    monkeypatch.setenv("CMC_FAST_KERNELS", "triton")
    guarded = []
    guard = utils.device_guard

    def recording_guard(t):
        guarded.append(t.device)
        return guard(t)

    monkeypatch.setattr(utils, "device_guard", recording_guard)
    torch.manual_seed(0)
    anchor = torch.nn.functional.normalize(torch.randn(4, 16), dim=1).requires_grad_()
    bank = torch.nn.functional.normalize(torch.randn(32, 16), dim=1)
    idx = torch.randint(0, 32, (4, 9))

    def launches(op) -> int:
        before = len(guarded)
        op()
        return len(guarded) - before

    assert launches(lambda: ops.nce_loss(anchor, bank, idx, tau=0.07, z=100.0, n_data=32)) == 1
    assert launches(lambda: ops.nce_partition(anchor, bank, idx, tau=0.07, n_data=32)) == 1
    assert launches(lambda: ops.bank_update_(bank, idx[:, 0], anchor.detach(), 0.5)) == 1
    block = Block([8, 6], 2, mm_dim=8, chunks=2, rank=2)
    out = None

    def forward():
        nonlocal out
        out = block([torch.randn(3, 8), torch.randn(3, 6)])

    assert launches(forward) == 1
    assert launches(lambda: out.sum().backward()) == 1
    assert set(guarded) == {torch.device("cpu")}
