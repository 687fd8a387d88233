#!/bin/bash
# GPU session driver: env, default run cold + warm, CUDA tests, kernel bench; each step bounded by a deadline.
T0=$(date +%s); DEADLINE=$((T0 + ${BUDGET:-560}))
left() { echo $(( DEADLINE - $(date +%s) )); }
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
python3 -c "import transformers, tokenizers" || { echo "carried wheels fail to import; using the image's"; unset PYTHONPATH; }
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; nproc;
  python3 -c "import sys, torch, triton, transformers, tokenizers; print(sys.version); print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'tokenizers', tokenizers.__version__)"; } 2>&1 | tee $OUT/env.txt
step() {  # step NAME MAXSECONDS CMD...
  local name=$1 max=$2; shift 2; local l=$(left); local t=$(( max < l ? max : l ))
  if [ $t -lt 15 ]; then echo "== $name skipped (no time left)" | tee -a $OUT/env.txt; return; fi
  local s=$(date +%s%N); timeout $t "$@" > $OUT/$name.log 2>&1; local rc=$?
  local e=$(date +%s%N); echo "== $name rc=$rc wall=$(( (e - s) / 1000000 )) ms (limit $t s)" | tee -a $OUT/env.txt
  tail -5 $OUT/$name.log
}
step cold 300 python3 federated.py --scenario hetero --out /tmp/runs/cold --cache /tmp/cache
step warm 150 python3 federated.py --scenario hetero --out /tmp/runs/warm --cache /tmp/cache
(cd /tmp/runs && tar czf $OUT/runs.tar.gz $(ls -d */results.json */log.jsonl */*.png 2>/dev/null))
step tests 90 python3 -m pytest -q -rs tests/test_kernels.py tests/test_distill.py
step bench 400 python3 -m kernels.bench --shapes paper --out $OUT/bench_h200.csv
echo "total $(( $(date +%s) - T0 )) s"
