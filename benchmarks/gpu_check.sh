#!/usr/bin/env bash
# Issue 4 GPU check, for a machine with CUDA (not run on the 2-core CPU development machine):
#   1. faiss-gpu against faiss-cpu on the pipeline's clustering (benchmarks/gpu_faiss.py);
#   2. the embed stage as two accelerate processes on the GPU(s) against one CPU process, on
#      real images: same shards, same ids, cosine >= 0.999 per image.
# Usage: bash benchmarks/gpu_check.sh [OUT_DIR]      (env: N=faiss rows, NPROC=processes, PER_CLASS)
# DRY_RUN=1 runs the same steps without CUDA (CPU processes), to check the script itself.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-outputs/gpu_check}
N=${N:-1000000}
NPROC=${NPROC:-2}
PER_CLASS=${PER_CLASS:-50}
DATA=${RSPRUNE_DATA:-../shared/data}
mkdir -p "$OUT"
if [ -z "${DRY_RUN:-}" ]; then
    nvidia-smi -L
    python -c "import torch; assert torch.cuda.is_available(), 'torch sees no CUDA device'; print('torch', torch.__version__, 'GPUs', torch.cuda.device_count())"
fi

echo "== 1. faiss-gpu vs faiss-cpu (N=$N)"
if python -c "import sys; from rsprune.knn import gpu_available; sys.exit(0 if gpu_available() else 1)"; then
    python benchmarks/gpu_faiss.py --n "$N" 2>&1 | tee "$OUT/gpu_faiss.txt"
else
    echo "SKIPPED: faiss has no GPU support here (install faiss-gpu); the CPU path is what runs" | tee "$OUT/gpu_faiss.txt"
fi

echo "== 2. embed: $NPROC accelerate processes on GPU vs 1 CPU process"
CORPUS="$OUT/corpus"
rm -rf "$CORPUS"
for cls in "$DATA"/nwpu12/test/*/; do  # PER_CLASS real images of each class, as links
    mkdir -p "$CORPUS/$(basename "$cls")"
    ls "$cls" | sort | head -n "$PER_CLASS" | while read -r f; do ln -s "$(realpath "$cls/$f")" "$CORPUS/$(basename "$cls")/$f"; done
done
COMMON=(method=random "data.corpus=[$(realpath "$CORPUS")]" embed.shard_size=64 embed.dtype=float32 report.enabled=false)
rm -rf "$OUT/cache_cpu" "$OUT/cache_gpu"
python prune/embed.py "${COMMON[@]}" cache_dir="$OUT/cache_cpu" encoder.device=cpu
accelerate launch --multi_gpu --num_processes "$NPROC" --num_machines 1 --mixed_precision no --dynamo_backend no \
    prune/embed.py "${COMMON[@]}" cache_dir="$OUT/cache_gpu" encoder.device=auto
python - "$OUT" <<'PY'
import sys
from pathlib import Path
import numpy as np
out = Path(sys.argv[1])
cpu, gpu = (sorted((out / c / "embed").glob("*/*.npy")) for c in ("cache_cpu", "cache_gpu"))
assert [p.name for p in cpu] == [p.name for p in gpu], "CPU and GPU runs wrote different shards"
worst = 1.0
for a, b in zip(cpu, gpu):
    x, y = np.load(a), np.load(b)
    if a.name.endswith(".ids.npy"):
        assert x.tolist() == y.tolist(), f"{a.name}: ids differ"
    else:
        worst = min(worst, float((x * y).sum(axis=1).min()))
print(f"{len(cpu) // 2} shards; min cosine GPU ({'multi-process'}) vs CPU: {worst:.6f}")
assert worst >= 0.999, "GPU embeddings differ from the CPU ones"
PY
echo "GPU check passed; outputs under $OUT"
