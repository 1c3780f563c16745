#!/usr/bin/env bash
# GPU path check: precompute (--device cuda --amp), a FAISS GPU index and mining, one-GPU and
# (with 2+ GPUs) two-GPU training, each compared with the CPU path; prints throughput.
#
#   bash benchmarks/gpu_check.sh                # on a CUDA machine (one H100: ~3-5 minutes)
#   bash benchmarks/gpu_check.sh --cpu-dry-run  # the same steps, CPU against CPU, small (tests/test_gpu_check.py)
#
# Self-contained: writes its own WebDataset shards (random 28x28 images, 10 labels) and stores
# under a temp dir (removed at the end; KEEP=1 keeps it), installs nothing, needs no network.
# Uses the python on PATH (activate the venv first). Exit status: 0 all checks passed,
# 1 a check failed, 2 no CUDA device (without --cpu-dry-run). See docs/GPU.md.
set -euo pipefail

MODE=gpu
for arg in "$@"; do
  case "$arg" in
    --cpu-dry-run) MODE=cpu ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown argument $arg (use --cpu-dry-run or nothing)" >&2; exit 2 ;;
  esac
done
export RAY_USAGE_STATS_ENABLED=0 HF_HUB_OFFLINE=1 PYTHONHASHSEED=0
PY=${PYTHON:-python}
ROOT=$(cd "$(dirname "$0")/.." && pwd)

if [[ $MODE == gpu ]]; then
  if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: torch.cuda.is_available() is False: no CUDA device or a CPU-only torch" \
         "($("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null || echo 'torch missing')). Run it on a GPU" \
         "machine with a CUDA torch, or use --cpu-dry-run to check the steps on the CPU." >&2
    exit 2
  fi
  NGPU=$("$PY" -c 'import torch; print(torch.cuda.device_count())')
  DEV=cuda; AMP=--amp; PER_SHARD=4096; SHARDS=4; EPOCHS=2
else
  NGPU=0; DEV=cpu; AMP=; PER_SHARD=256; SHARDS=2; EPOCHS=1
fi
WORK=$(mktemp -d "${TMPDIR:-/tmp}/kdstore-gpucheck-XXXXXX")
[[ ${KEEP:-0} == 1 ]] || trap 'rm -rf "$WORK"' EXIT
echo "gpu_check: mode $MODE, $NGPU GPU(s), work dir $WORK"
FAILED=0
check() {  # check NAME PYTHON_EXPR_PRINTING_OK_AND_DETAIL
  if out=$("$PY" -c "$2"); then echo "PASS $1: $out"; else echo "FAIL $1: $out"; FAILED=1; fi
}
timed() {  # timed VAR CMD...: run, store seconds in VAR
  local var=$1; shift; local t0=$EPOCHREALTIME
  "$@" > "$WORK/last.log" 2>&1 || { tail -30 "$WORK/last.log" >&2; echo "FAIL: $*" >&2; exit 1; }
  printf -v "$var" '%s' "$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')"
}

# 1. shards ---------------------------------------------------------------------------------
"$PY" - "$WORK/data" "$SHARDS" "$PER_SHARD" <<'EOF'
import sys
from pathlib import Path
import numpy as np
from kdstore.pipeline.datasets import _png, write_shards
out, shards, per = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
rng = np.random.default_rng(0)
for split, n in (("train", shards * per), ("test", per)):
    labels = rng.integers(0, 10, n)
    base = rng.integers(0, 256, (10, 28, 28))  # one template per label, plus noise: learnable
    def samples():
        for i in range(n):
            img = np.clip(base[labels[i]] * 0.7 + rng.integers(0, 77, (28, 28)), 0, 255).astype(np.uint8)
            yield {"__key__": f"{split}_{i:06d}", "png": _png(img), "cls": str(int(labels[i])).encode()}
    write_shards(samples(), out, split, per, n, progress=False)
EOF
ROWS=$(( SHARDS * PER_SHARD + PER_SHARD ))

# 2. precompute: CPU reference, then $DEV ------------------------------------------------------
pre() {  # pre STORE DEVICE [--amp]
  kdstore precompute --store "$1" -i "$WORK/data/train-*.tar" -i "$WORK/data/test-*.tar" \
    --teacher kdstore.pipeline.zoo:fashion_cnn --teacher-name cnn --layer embed \
    --output logits --output embedding:embed --dtype float32 --batch-size 512 --workers 1 --device "$2" ${3:-} --no-progress
}
timed T_PRE_CPU pre "$WORK/cpu" cpu
timed T_PRE_DEV pre "$WORK/dev" "$DEV" $AMP
echo "precompute: $ROWS rows, cpu ${T_PRE_CPU}s, $DEV${AMP:+ amp} ${T_PRE_DEV}s"
check "stored logits $DEV${AMP:+ (AMP)} vs cpu" "
import numpy as np
from kdstore.store import open_store
a = open_store('$WORK/cpu').teacher('cnn').read('logits'); b = open_store('$WORK/dev').teacher('cnn').read('logits')
err = float(np.abs(a - b).max()); scale = float(np.abs(a).max()); agree = float((a.argmax(1) == b.argmax(1)).mean())
print(f'max |diff| {err:.2e} (logit scale {scale:.2f}), argmax agreement {agree:.4f}')
assert err <= 2e-2 * max(scale, 1.0) and agree >= 0.99  # fp16 autocast: ~1e-3 relative
"

# 3. index + mining ------------------------------------------------------------------------
check "faiss index on $DEV vs cpu flat" "
import time, numpy as np
from kdstore.store import open_store
from kdstore.store.index import IndexSpec, build_index, gpu_available
x = open_store('$WORK/dev').teacher('cnn').read('embedding')
on_gpu = gpu_available()
assert on_gpu or '$MODE' == 'cpu', 'faiss sees no GPU: install faiss-gpu in place of faiss-cpu (docs/GPU.md)'
q = x[: 1000]
flat = build_index(x, IndexSpec(kind='flat')); ivf = build_index(x, IndexSpec(kind='ivf'))
assert ivf.on_gpu == on_gpu
t = time.perf_counter(); _, got = ivf.search(q, 10); s = time.perf_counter() - t
_, truth = flat.search(q, 10)
recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, truth)]))
print(f'ivf on {\"gpu\" if on_gpu else \"cpu\"}: build {ivf.build_seconds:.2f}s, {len(q) / s:,.0f} queries/s, recall@10 vs flat {recall:.3f}')
assert recall >= 0.9
"
timed T_MINE_CPU env CUDA_VISIBLE_DEVICES= kdstore mine "$WORK/cpu" --teacher cnn --kind flat --num-negatives 4 --name hn
timed T_MINE_DEV kdstore mine "$WORK/dev" --teacher cnn --kind flat --num-negatives 4 --name hn
echo "mining ($ROWS rows, flat): cpu ${T_MINE_CPU}s, $DEV ${T_MINE_DEV}s"
check "mined negatives $DEV vs cpu" "
import numpy as np
from kdstore.store.retrieval import load_negatives
a, _ = load_negatives('$WORK/cpu', 'hn'); b, _ = load_negatives('$WORK/dev', 'hn')
pa, pb = a.column('positive_row').to_numpy(), b.column('positive_row').to_numpy()
na, nb = a.column('negative_rows').to_pylist(), b.column('negative_rows').to_pylist()
overlap = float(np.mean([len(set(x) & set(y)) / max(1, len(x)) for x, y in zip(na, nb)]))
print(f'positives equal {float((pa == pb).mean()):.4f}, negative overlap {overlap:.4f}')
assert (pa == pb).mean() >= 0.95 and overlap >= 0.9
"

# 4. training: cpu, one GPU, two GPUs ------------------------------------------------------------
cat > "$WORK/train.toml" <<EOF
[data]
store = "$WORK/dev"
train_shards = ["train-"]
eval_shards = ["test-"]
labels = "all"
batch_size = 256
[model]
arch = "mlp"
hidden = 64
[optim]
name = "adamw"
lr = 3e-3
[train]
epochs = $EPOCHS
seed = 0
log_every_steps = 1
progress = false
[[loss]]
kind = "ce"
weight = 0.5
[[loss]]
kind = "kd"
teacher = "cnn"
temperature = 2.0
weight = 0.5
[[loss]]
kind = "contrastive"
teacher = "cnn"
negatives = "hn"
temperature = 0.1
weight = 0.2
EOF
timed T_TRAIN_CPU kdstore train "$WORK/train.toml" --out "$WORK/t_cpu" --set train.device='"cpu"' --set train.amp='"off"'
timed T_TRAIN_DEV kdstore train "$WORK/train.toml" --out "$WORK/t_dev" --set train.device="\"$DEV\""
RUNS="t_dev"
if (( NGPU >= 2 )); then
  timed T_TRAIN_DDP torchrun --standalone --nproc_per_node 2 -m kdstore.cli.main train "$WORK/train.toml" --out "$WORK/t_ddp" --set train.device='"cuda"'
  RUNS="t_dev t_ddp"
fi
SAMPLES=$(( SHARDS * PER_SHARD * EPOCHS ))
echo "training $SAMPLES samples: cpu ${T_TRAIN_CPU}s, 1x$DEV ${T_TRAIN_DEV}s${T_TRAIN_DDP:+, 2x$DEV ${T_TRAIN_DDP}s} (includes start-up)"
for run in $RUNS; do
  TOL="0.05, 0.25"; [[ $run == t_ddp ]] && TOL="0.15, 0.3"  # DDP: rank 0 logs its half of each batch
  check "training loss $run vs cpu" "
import json
def losses(d):
    return [r['loss'] for r in map(json.loads, open(f'$WORK/{d}/metrics.jsonl')) if 'loss' in r]
a, b = losses('t_cpu'), losses('$run')
first = abs(a[0] - b[0]) / abs(a[0]); last = abs(a[-1] - b[-1]) / abs(a[-1])
print(f'first logged loss cpu {a[0]:.4f} / {b[0]:.4f}, last cpu {a[-1]:.4f} / {b[-1]:.4f} ({len(a)} vs {len(b)} logged steps)')
tol_first, tol_last = $TOL
assert first <= tol_first and last <= tol_last
"
done
if (( FAILED )); then echo "gpu_check: FAILED (see the FAIL lines)"; exit 1; fi
echo "gpu_check: all checks passed ($MODE)"
