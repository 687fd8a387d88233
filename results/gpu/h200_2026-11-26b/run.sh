#!/bin/bash
# The next GPU session's one call (device tool: carry .whl with transformers 5.24.0, tokenizers 0.23.3,
# liger-kernel 0.8.5, cut-cross-entropy 25.1.1 wheels for Python 3.12; see results/gpu/h200_2026-11-26/run.sh):
#   BUDGET=540 bash results/gpu/next.sh 2>&1 | tee $OUT/driver.log
# 1. diagnose.py: why the default preset learns less on the GPU than on a CPU, and where a step's 40 ms go;
# 2. the CUDA variants of the kernel and distillation tests;
# 3. the default run, cold (its per-phase table), if the diagnosis left time;
# 4. the kernel bench at the two large heads (0.5B was measured on 2026-11-26).
T0=$(date +%s); DEADLINE=$((T0 + ${BUDGET:-540}))
left() { echo $(( DEADLINE - $(date +%s) )); }
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
step diagnose 220 python3 results/gpu/diagnose.py --parties slm3,llm --steps 300 --eval 32 --profile 20
step tests 70 python3 -m pytest -q -rs tests/test_kernels.py tests/test_distill.py
step cold 180 python3 federated.py --scenario hetero --out /tmp/runs/cold --cache /tmp/cache
step bench 110 python3 -m kernels.bench --shapes 7b --out $OUT/bench_7b.csv
echo "total $(( $(date +%s) - T0 )) s"
