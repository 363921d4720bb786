"""The tiny synthetic run every trainer test starts from (CLI flags and the same as a Config). Imported as
``from tiny import ...``: pytest puts ``tests/`` on sys.path (no ``__init__.py`` here), under ``pytest`` and
``python -m pytest`` alike."""

import dataclasses

from cmc_fast.config import Config, preset

TINY = ["--synthetic-n", "96,40", "--epochs", "1", "--fusion-epochs", "2", "--batch-size", "16", "--nce-k", "16",
        "--max-len", "16", "--image-size", "32,32", "--mm-dim", "32", "--chunks", "4", "--rank", "3", "--no-progress"]


def tiny_config(tmp_path, **overrides) -> Config:
    values = dict(synthetic_train=96, synthetic_test=40, epochs=1, fusion_epochs=2, batch_size=16, nce_k=16,
                  max_len=16, image_size=(32, 32), mm_dim=32, chunks=4, rank=3, progress=False,
                  data_root=str(tmp_path / "data"))
    values.update(overrides)
    return dataclasses.replace(preset("synthetic"), **values).validate()


def one_line_error(capsys) -> str:
    """The one ``cmc-fast: error:`` line a refused command printed on stderr (and no traceback)."""
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("cmc-fast: error:")]
    assert len(lines) == 1, err
    return lines[0]
