"""Predict throughput (posts/s) of the synthetic preset's tiny encoders: ``predict_file`` end to end on a JSONL
manifest of 400 synthetic test posts (read, tokenise, decode and resize each JPEG at 64x64 through the run's image
backend, score, write one JSON line each), per variant.

The run is trained for one epoch per stage (weights do not change the time) with the preset's sizes otherwise.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from cmc_fast.data_pipeline.image_backend import resolve_backend
from cmc_fast.data_pipeline.registry import load_dataset

from cmc_fast.benchmark import bench_device
from cmc_fast.cli import main
from cmc_fast.config import Config
from cmc_fast.detector import Detector
from cmc_fast.predict import predict_file

N_TEST = 400


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    base = tmp_path_factory.mktemp("bench-predict")
    data = os.environ.get("CMC_FAST_BENCH_DATA") or str(base / "data")
    out = base / "run"
    assert main(["train", "--dataset", "synthetic", "--data-root", data, "--synthetic-n", f"200,{N_TEST}",
                 "--epochs", "1", "--fusion-epochs", "1", "--variant", "cmc,cmc-shared,finetune-t",
                 "--no-progress", "--out", str(out)]) == 0
    cfg = Config.from_dict(json.loads((out / "config.json").read_text()))
    records = load_dataset(cfg.dataset, cfg.data_root, seed=cfg.seed, n_train=cfg.synthetic_train,
                           n_test=cfg.synthetic_test).test
    manifest = base / "posts.jsonl"
    # the images may live outside the manifest's folder ($CMC_FAST_BENCH_DATA): named by absolute path, opted in
    os.environ["CMC_FAST_IMAGES_ANYWHERE"] = "1"
    manifest.write_text("".join(json.dumps({"id": r.id, "text": r.text, "image": r.image_paths[0]}) + "\n"
                                for r in records))
    return out, manifest


@pytest.mark.parametrize("variant", ["cmc", "cmc-shared", "finetune-t"])
@pytest.mark.parametrize("batch_size", [64])
def test_predict_throughput(benchmark, record, trained, variant, batch_size):
    out, manifest = trained
    device = bench_device()
    detector = Detector.from_run(out, variant, device=str(device))

    def run():
        with open(os.devnull, "w") as sink:
            summary = predict_file(detector, manifest, sink, batch_size=batch_size, progress=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
        assert summary.posts == N_TEST and summary.failed == 0

    benchmark.pedantic(run, rounds=3, warmup_rounds=1)
    median = benchmark.stats.stats.median
    record(benchmark, group=f"predict {N_TEST} synthetic posts (tiny encoders, 64x64, max_len 40, batch "
                            f"{batch_size})", provider=variant, posts_per_s=round(N_TEST / median, 1),
           threads=torch.get_num_threads(),
           image_backend=resolve_backend(detector.cfg.image_backend, device))
