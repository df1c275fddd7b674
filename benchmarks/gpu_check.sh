#!/usr/bin/env bash
# The GPU check: a few minutes on one GPU. Runs the `gpu`-marked tests (bf16 gradient-cached step vs the fp32
# naive full-batch gradient, the fused AdamW kernel, the preemption flag over NCCL, the cached caption decoder
# vs open_clip generate), then benchmarks/gpu_pretrain_mfu.py (ViT-B/16 bf16, micro-batch 256) and
# benchmarks/gpu_caption.py (coca_ViT-L-14 bf16, batch 256), and prints one table. Put its figures in
# docs/benchmarks.md (GPU check).
#
#   bash benchmarks/gpu_check.sh                 # from the repository root; writes runs/gpu_check/
#   OUT=/tmp/gpu_check bash benchmarks/gpu_check.sh
#
# Without a CUDA device it says so and exits 3: nothing is measured. SMOKE=1 runs the script itself on a CPU
# with tiny models (the gpu tests skip; the table is titled as a CPU smoke run, never a GPU figure).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.venv/torch_extensions}

SMOKE=${SMOKE:-0}
MFU_ARGS=(--steps 10 --warmup 3)
CAPTION_ARGS=(--batch-sizes 256 --iters 2)
if [[ $SMOKE == 1 ]]; then
  MFU_ARGS=(--model debug --image-size 64 --context 32 --micro-batch 8 --steps 2 --warmup 1 --precision fp32 --zero-stage 0 --cpu)
  CAPTION_ARGS=(--arch coca_debug --device cpu --precision fp32 --batch-sizes 4 --iters 1 --max-len 8)
elif ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu_check: no CUDA device here: nothing measured" >&2
  exit 3
fi

start=$(date +%s)
"$PY" -m pytest -m gpu tests/test_gpu.py tests/test_engine_bf16.py -q -rA -s -p no:cacheprovider \
  >"$OUT/tests.log" 2>&1
tests_rc=$?
"$PY" -m benchmarks.gpu_pretrain_mfu "${MFU_ARGS[@]}" >"$OUT/pretrain_mfu.log" 2>&1
mfu_rc=$?
"$PY" -m benchmarks.gpu_caption "${CAPTION_ARGS[@]}" --out "$OUT/caption.json" >"$OUT/caption.log" 2>&1
caption_rc=$?

"$PY" - "$OUT" "$tests_rc" "$mfu_rc" "$caption_rc" "$(( $(date +%s) - start ))" <<'PYEOF'
import json, re, sys
from pathlib import Path

import torch

out, tests_rc, mfu_rc, caption_rc, seconds = Path(sys.argv[1]), *map(int, sys.argv[2:])
rows = []
log = (out / "tests.log").read_text()
for status, test in re.findall(r"^(PASSED|FAILED|ERROR|SKIPPED)(?: \[\d+\])? (\S+)", log, re.M):
    rows.append((f"test {test.split('::')[-1][:70]}", status))
err = re.search(r"bf16 gradient-cached step: relative error (\S+) \(bound (\S+),", log)
if err:
    rows.append(("bf16 cached step: relative gradient error (bound)", f"{err[1]} ({err[2]})"))
mfu_log = (out / "pretrain_mfu.log").read_text()
match = re.search(r"^\{.*?^\}", mfu_log, re.M | re.S)
if mfu_rc == 0 and match:
    r = json.loads(match[0])
    rows += [
        (f"{r['model']} {r['precision']} step, micro-batch {r['micro_batch']}: samples/s/GPU", r["samples_per_s_per_device"]),
        ("  MFU", f"{100 * r['mfu']:.1f}% of {r['peak_tflops_per_device']:g} TFLOP/s"),
        ("  step time s / peak memory GiB", f"{r['step_s']} / {r['memory_gib']}"),
    ]
else:
    rows.append(("gpu_pretrain_mfu", f"FAILED (exit {mfu_rc}, see {out}/pretrain_mfu.log)"))
caption = out / "caption.json"
if caption_rc == 0 and caption.exists():
    data = json.loads(caption.read_text())
    for r in data if isinstance(data, list) else data.get("results", [data]):
        for key, value in r.items():
            if key.endswith("_per_s") or "speedup" in key or "memory" in key:
                rows.append((f"caption batch {r.get('batch_size', '?')}: {key}", value))
else:
    rows.append(("gpu_caption", f"FAILED (exit {caption_rc}, see {out}/caption.log)"))
name = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU smoke run, not a GPU measurement"
width = max(len(k) for k, _ in rows)
print(f"\nGPU check on {name} ({seconds} s; logs in {out}/)\n")
print(f"| {'check'.ljust(width)} | result |\n|{'-' * (width + 2)}|--------|")
for key, value in rows:
    print(f"| {key.ljust(width)} | {value} |")
PYEOF
exit $(( tests_rc || mfu_rc || caption_rc ))
