#!/usr/bin/env bash
# Text-only finetune-t on the real Weibo split (att-RNN: 7531 train / 1996 test posts), a tiny BERT trained
# from scratch on a CPU, against the char TF-IDF + logistic-regression baseline of ../shared/data/README.md
# (test accuracy 0.804). Results and their reading: bench/results/weibo-finetune-t-cpu.md.
#
# Usage: scripts/weibo_text_baseline.sh [shipped|proposed|all]     (default: all)
#   shipped   the runs on the code as it was when they were made (cmc-fast train, no patch). Both proposed
#             fixes have since landed (data_pipeline/text.py regex, min_freq=2 in cmc_fast/data.py), so on the
#             current code "shipped" and "proposed" run the same tokeniser.
#   proposed  the same CLI with the two proposed data_pipeline/text.py fixes patched in at run time (nothing
#             in the repository is modified): CJK characters always stand alone, and the tiny vocabulary
#             keeps tokens seen >= PROTO_MIN_FREQ times so [UNK] is trained. See the results file.
#
# Every run selects its epoch on the validation split the trainer carves from train (10%, seed 0) and scores
# the test split once. Settings were compared on validation accuracy only.
# Env: DATA (default ../shared/data/weibo), OUT (default runs/weibo-text), SEEDS (final; default "0 1 2"),
# CMC_FAST_CACHE (token cache).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/weibo}
OUT=${OUT:-runs/weibo-text}
WHICH=${1:-all}
mkdir -p "$OUT"

# tiny encoder sizes are Config keys without a CLI flag: pass them with --config
printf '{"tiny_text_dim": 64, "tiny_text_layers": 2}\n' > "$OUT/d64l2.json"
printf '{"tiny_text_dim": 128, "tiny_text_layers": 2}\n' > "$OUT/d128l2.json"

COMMON=(--dataset weibo --data-root "$DATA" --variant finetune-t --text-model tiny --no-progress)

shipped() {  # name, extra flags...
    local name=$1; shift
    /usr/bin/time -f "$name: wall %e s" cmc-fast train "${COMMON[@]}" --out "$OUT/$name" "$@"
}

# `cmc-fast train` with the proposed tokeniser fixes monkeypatched in (PROTO_REGEX=1, PROTO_MIN_FREQ=k)
proposed() {  # name, extra flags...
    local name=$1; shift
    PROTO_REGEX=1 PROTO_MIN_FREQ=${PROTO_MIN_FREQ:-2} /usr/bin/time -f "$name: wall %e s" python - train \
        "${COMMON[@]}" --out "$OUT/$name" "$@" <<'PY'
import os, re, sys
import data_pipeline.text as text
if os.environ.get("PROTO_REGEX") == "1":
    # shipped: r"[CJK]|[^\W_]+|[^\w\s]" -- [^\W_]+ also matches CJK, so a CJK run after a digit or Latin
    # letter is swallowed into one word token ("2013年7月15日沈阳" -> one token, hapax, [UNK] at test)
    CJK = r"\u3400-\u9fff\uf900-\ufaff"
    text._TOKEN_RE = re.compile(rf"[{CJK}]|[^\W_{CJK}]+|[^\w\s]", re.UNICODE)
k = int(os.environ.get("PROTO_MIN_FREQ", "1"))
if k > 1:  # data.prepare calls VocabTokenizer.build(texts) with the default min_freq=1
    build = text.VocabTokenizer.build.__func__
    text.VocabTokenizer.build = classmethod(lambda cls, t, max_size=20000, min_freq=k: build(cls, t, max_size, min_freq))
g = float(os.environ.get("PROTO_GROUPED", "0"))
if g > 0:  # replace the random validation carve (cmc_fast.data imported split_validation by name)
    import dataclasses, random
    import cmc_fast.data
    from scipy.sparse.csgraph import connected_components
    from sklearn.feature_extraction.text import TfidfVectorizer

    def grouped_split(train, fraction, seed):
        x = TfidfVectorizer(analyzer="char", ngram_range=(3, 3)).fit_transform([r.text or "[empty]" for r in train])
        sim = x @ x.T
        sim.data[sim.data < g] = 0
        sim.eliminate_zeros()
        n, comp = connected_components(sim, directed=False)
        groups = {}
        for i, c in enumerate(comp):
            groups.setdefault(c, []).append(i)
        order = list(groups.values())
        random.Random(seed).shuffle(order)
        want = {lab: round(fraction * sum(r.label == lab for r in train)) for lab in (0, 1)}
        got, val_idx = {0: 0, 1: 0}, set()
        for grp in order:  # whole groups, about `fraction` of each label
            lab = round(sum(train[i].label for i in grp) / len(grp))
            if got[lab] + len(grp) <= want[lab] * 1.02:
                val_idx.update(grp)
                got[lab] += len(grp)
        fit = [r for i, r in enumerate(train) if i not in val_idx]
        val = [dataclasses.replace(r, split="val") for i, r in enumerate(train) if i in val_idx]
        print(f"grouped validation: {n} near-duplicate groups; val {len(val)} posts "
              f"({sum(r.label for r in val)} fake), fit {len(fit)}", file=sys.stderr)
        return fit, val

    cmc_fast.data.split_validation = grouped_split
from cmc_fast.cli import main
sys.exit(main(sys.argv[1:]))
PY
}

if [[ $WHICH == shipped || $WHICH == all ]]; then
    # the weibo preset's text_lr (2e-5, for fine-tuning BERT-wwm) inherited by the from-scratch model
    shipped A1_preset_d128_L160_1ep --max-len 160 --epochs 1
    shipped A2_preset-lr2e-5_d64_L128 --config "$OUT/d64l2.json" --max-len 128 --epochs 8
    # from-scratch learning rates
    shipped B_d64_L128_lr1e-3 --config "$OUT/d64l2.json" --max-len 128 --text-lr 1e-3 --epochs 8
    shipped C_d64_L128_lr3e-4 --config "$OUT/d64l2.json" --max-len 128 --text-lr 3e-4 --epochs 8
fi

if [[ $WHICH == proposed || $WHICH == all ]]; then
    PROTO_MIN_FREQ=1 proposed P1_regex_d64_L128 --config "$OUT/d64l2.json" --max-len 128 --text-lr 1e-3 --epochs 8
    proposed P2_regex-mf2_d64_L128 --config "$OUT/d64l2.json" --max-len 128 --text-lr 1e-3 --epochs 8
    proposed P3_regex-mf2_d64_L160 --config "$OUT/d64l2.json" --max-len 160 --text-lr 1e-3 --epochs 8
    proposed P4_regex-mf2_d128_L160_lr5e-4 --config "$OUT/d128l2.json" --max-len 160 --text-lr 5e-4 --epochs 8
    proposed P5_regex-mf2_d64_L160_lr5e-4 --config "$OUT/d64l2.json" --max-len 160 --text-lr 5e-4 --epochs 8
    proposed P6_regex-mf2_d64_L160_bs64 --config "$OUT/d64l2.json" --max-len 160 --text-lr 1e-3 --batch-size 64 \
        --epochs 8
fi

if [[ $WHICH == final || $WHICH == all ]]; then
    for seed in ${SEEDS:-0 1 2}; do
        PROTO_GROUPED=0.5 proposed F_regex-mf2-grouped_d64_L160_seed$seed --config "$OUT/d64l2.json" --max-len 160 \
            --text-lr 1e-3 --epochs 8 --seed "$seed"
    done
fi

# one line per run: name, val accuracy (selection), test accuracy and P/R/F1, wall seconds
python - "$OUT" <<'PY'
import json, pathlib, sys
for run in sorted(pathlib.Path(sys.argv[1]).glob("*/metrics.json")):
    m = json.loads(run.read_text()); r = m["results"]["finetune-t"]; t = r["test"]
    print(f"{run.parent.name:36s} val {r['val_accuracy']:.4f}  test {t['accuracy']:.4f}  "
          f"fake P/R/F1 {t['fake_precision']:.3f}/{t['fake_recall']:.3f}/{t['fake_f1']:.3f}  "
          f"real P/R/F1 {t['real_precision']:.3f}/{t['real_recall']:.3f}/{t['real_f1']:.3f}  "
          f"wall {m['wall_seconds']:.0f}s")
PY
