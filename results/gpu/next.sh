#!/bin/bash
# The next GPU session's one call (device tool: carry .whl with transformers 5.24.0, tokenizers 0.23.3,
# liger-kernel 0.8.5, cut-cross-entropy 25.1.1 wheels for Python 3.12; see results/gpu/h200_2026-11-26/run.sh):
#   BUDGET=540 bash results/gpu/next.sh 2>&1 | tee $OUT/driver.log
# 1. the CUDA tests of the kernels and distillation (new: a whole step under torch's sync debug mode);
# 2. the default run's fp32 LLM warm-up, its first 300 steps (ms/step, loss per 50 steps, a profile of 20
#    steps), against the same 19,200 samples in 75 steps of 256 at twice the lr (schedule of 1500 steps):
#    does a 4x larger batch cost about the same per step (overhead-bound) and reach the same loss?
# 3. the default run, cold (fp32 + TF32), with that warm-up (--warm_batch 256, a quarter of the steps, lr x2:
#    today's 6000 + 3 x 1500 steps at about 45 ms leave no time for the rounds); its log gives the per-phase
#    table (warm-ups here, `phases` of each round in log.jsonl) and the accuracies after warm-up: if they
#    reach the CPU preset's, the default preset takes these warm-up values;
# 4. the same run again with what the cold run cached (the rounds, if the cold run's time ran out in them);
# 5. the kernel bench at the 8B head (the lean backward, LADA_KERNEL_BACKWARD=lean, among its providers), then the
#    frozen head (weight without gradient) at the 7B head.
T0=$(date +%s); DEADLINE=$((T0 + ${BUDGET:-540}))
left() { echo $(( DEADLINE - $(date +%s) )); }
mkdir -p /tmp/runs
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
python3 -c "import transformers, tokenizers" || { echo "carried wheels fail to import; using the image's"; unset PYTHONPATH; }
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; git log -1 --format=%h 2>/dev/null;
  python3 -c "import sys, torch, triton, transformers; print(sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"; } 2>&1 | tee /tmp/runs/env.txt
step() {  # step NAME MAXSECONDS CMD...
  local name=$1 max=$2; shift 2; local l=$(left); local t=$(( max < l ? max : l ))
  if [ $t -lt 15 ]; then echo "== $name skipped (no time left)" | tee -a /tmp/runs/env.txt; return; fi
  local s=$(date +%s%N); timeout $t "$@" > $OUT/$name.log 2>&1; local rc=$?
  local e=$(date +%s%N); echo "== $name rc=$rc wall=$(( (e - s) / 1000000 )) ms (limit $t s)" | tee -a /tmp/runs/env.txt
  grep -v "^warm-up" $OUT/$name.log | tail -8
}
step tests 45 python3 -m pytest -q -rs tests/test_kernels.py tests/test_distill.py
WARM="--warm_batch 256 --warm_llm 1500 --warm_slm 375 --warm_lr 6e-3"
step warmup 80 sh -c "python3 study/diagnose.py --parties llm --modes fp32-auto --steps 300 --eval 0 --profile 20;
  python3 study/diagnose.py --parties llm --modes fp32-auto --steps 75 --eval 0 --profile 0 $WARM"
step cold 250 python3 federated.py --scenario hetero --out /tmp/runs/cold --cache /tmp/cache $WARM
step warm 120 python3 federated.py --scenario hetero --out /tmp/runs/warm --cache /tmp/cache $WARM
step bench 85 sh -c 'python3 -m kernels.bench --shapes 8b --out /tmp/runs/bench_8b.csv;
  python3 -m kernels.bench --shapes 7b --frozen --providers triton,triton_lean,eager --out /tmp/runs/bench_7b_frozen.csv'
(cd /tmp/runs && tar czf $OUT/data.tar.gz $(ls -d env.txt *.csv */results.json */log.jsonl 2>/dev/null))  # $OUT: 6 logs, driver.log (env.txt is in it too), this: 8 files
echo "total $(( $(date +%s) - T0 )) s"
