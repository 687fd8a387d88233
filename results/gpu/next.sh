#!/bin/bash
# The next GPU session's one call (device tool: carry .whl with transformers 5.24.0, tokenizers 0.23.3,
# liger-kernel 0.8.5, cut-cross-entropy 25.1.1 wheels for Python 3.12; see results/gpu/h200_2026-11-26/run.sh):
#   BUDGET=540 bash results/gpu/next.sh 2>&1 | tee $OUT/driver.log
# 0. diagnose.py --grads: which op bf16 autocast breaks on the GPU (one batch, fp32 vs bf16 x SDPA backends);
# 1. the default run, cold, now in fp32 + TF32 (bf16 autocast was the learning gap: results/gpu/h200_2026-11-26b/);
#    its log gives the per-phase table (warm-ups here, `phases` of each round in log.jsonl);
# 2. the kernel bench at the 8B head (the 0.5B and 7B heads were measured on the H200 on 2026-11-26);
# 3. the frozen head (weight without gradient, as under LoRA) at the 7B head: backward vs the full one;
# 4. the default run again with the warmed-up models cached.
T0=$(date +%s); DEADLINE=$((T0 + ${BUDGET:-540}))
left() { echo $(( DEADLINE - $(date +%s) )); }
mkdir -p /tmp/runs
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
python3 -c "import transformers, tokenizers" || { echo "carried wheels fail to import; using the image's"; unset PYTHONPATH; }
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; git log -1 --format=%h 2>/dev/null;
  python3 -c "import sys, torch, triton, transformers; print(sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"; } 2>&1 | tee $OUT/env.txt
step() {  # step NAME MAXSECONDS CMD...
  local name=$1 max=$2; shift 2; local l=$(left); local t=$(( max < l ? max : l ))
  if [ $t -lt 15 ]; then echo "== $name skipped (no time left)" | tee -a $OUT/env.txt; return; fi
  local s=$(date +%s%N); timeout $t "$@" > $OUT/$name.log 2>&1; local rc=$?
  local e=$(date +%s%N); echo "== $name rc=$rc wall=$(( (e - s) / 1000000 )) ms (limit $t s)" | tee -a $OUT/env.txt
  grep -v "^warm-up" $OUT/$name.log | tail -8
}
step grads 60 python3 results/gpu/diagnose.py --parties slm3 --modes fp32-torch --steps 30 --eval 0 --profile 0 --grads
step cold 300 python3 federated.py --scenario hetero --out /tmp/runs/cold --cache /tmp/cache
step bench 80 python3 -m kernels.bench --shapes 8b --out /tmp/runs/bench_8b.csv
step frozen 50 python3 -m kernels.bench --shapes 7b --frozen --providers triton,triton_dard,eager --out /tmp/runs/bench_7b_frozen.csv
step warm 120 python3 federated.py --scenario hetero --out /tmp/runs/warm --cache /tmp/cache
(cd /tmp/runs && tar czf $OUT/data.tar.gz $(ls -d *.csv */results.json */log.jsonl 2>/dev/null))  # $OUT holds 8 files at most
echo "total $(( $(date +%s) - T0 )) s"
