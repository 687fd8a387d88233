"""The default preset's warm-up on a GPU, taken apart: does it learn, and where do its steps go.

    python results/gpu/diagnose.py [--parties slm3,llm] [--steps 300] [--profile 20]

On 2026-11-26 (H200, results/gpu/h200_2026-11-26/) the default preset's warm-ups ended at batch
losses of 0.29 (llm) and 1.1-1.7 (SLMs), every party then solved 0-3% of its test problems, and a
step took about 40 ms whatever the model's size. This script runs the first `--steps` steps of one
party's warm-up, with the data, seed, initialization, batch order and learning-rate schedule of
that run, under each of: bf16 autocast + Triton head (the default), bf16 + torch head, fp32 +
Triton head, fp32 + torch head; it prints the mean batch loss of each block of 50 steps and the
milliseconds per step. The same first steps on a CPU in fp32 (`--device cpu --modes fp32-torch`)
give the reference. Then (`--profile N`) it profiles N steps of the default mode and prints the
ops that take the most CUDA and CPU time.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

import distill  # noqa: E402
import federated as F  # noqa: E402

MODES = {"bf16-triton": ("bf16", "triton"), "bf16-torch": ("bf16", "torch"),
         "fp32-triton": ("fp32", "triton"), "fp32-torch": ("fp32", "torch")}


class Stop(Exception):
    pass


def first_steps(cfg, splits, name, steps, dtype, kernel):
    """Losses of the first `steps` warm-up steps of party `name` (the real warm_up, stopped early)."""
    os.environ["LADA_KERNEL"] = kernel
    losses, sft, times = [], distill.sft_loss, []

    def recording(model, enc):
        if len(losses) in (1, steps - 1):  # time steps 2..steps (the first compiles kernels)
            if cfg["device"].startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.time())
        loss = sft(model, enc)
        losses.append(loss.detach())
        return loss

    def stop_at(point):
        if len(losses) >= steps:
            raise Stop

    distill.sft_loss, distill.crash_point = recording, stop_at
    cfg = dict(cfg, dtype=dtype, cache=os.path.join(cfg["cache"], f"{dtype}-{kernel}-{time.time_ns()}"))
    try:
        with distill.autocast(cfg["device"], dtype):
            F.build_parties(cfg, splits, only=[name])
    except Stop:
        pass
    finally:
        distill.sft_loss = sft
    ms = (times[-1] - times[0]) / max(1, steps - 2) * 1e3 if len(times) == 2 else float("nan")
    return [float(x) for x in torch.stack(losses).cpu()], ms


def profile(cfg, splits, name, steps):
    from torch.profiler import ProfilerActivity, profile as prof
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cfg["device"].startswith("cuda") else [])
    with prof(activities=acts) as p:
        first_steps(cfg, splits, name, steps, cfg["dtype"], "triton" if cfg["device"].startswith("cuda") else "torch")
    key = "self_cuda_time_total" if cfg["device"].startswith("cuda") else "self_cpu_time_total"
    print(p.key_averages().table(sort_by=key, row_limit=25))
    print(p.key_averages().table(sort_by="cpu_time_total", row_limit=15))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parties", default="slm3,llm")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--profile", type=int, default=20, help="steps to profile (0: none)")
    ap.add_argument("--cache", default="/tmp/diagnose_cache")
    args = ap.parse_args()
    cfg = F.resolve_config(F.parse_args(["--scenario", "hetero", "--preset", "default", "--device", args.device,
                                         "--cache", args.cache]))
    splits = F.make_data(cfg, 3)
    for name in args.parties.split(","):
        for mode in args.modes.split(","):
            losses, ms = first_steps(cfg, splits, name, args.steps, *MODES[mode])
            blocks = [sum(losses[i:i + 50]) / len(losses[i:i + 50]) for i in range(0, len(losses), 50)]
            print(f"{name} {mode:>11}: {ms:6.1f} ms/step (steps 2-{len(losses)}); "
                  f"mean loss per 50 steps: {' '.join(f'{b:.3f}' for b in blocks)}", flush=True)
        if args.profile:
            profile(cfg, splits, name, args.profile)


if __name__ == "__main__":
    main()
