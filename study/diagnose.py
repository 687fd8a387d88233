"""The default preset's warm-up on a GPU, taken apart: does it learn, does generation agree with itself, where do steps go.

    python study/diagnose.py [--parties slm3,llm] [--steps 300] [--eval 32] [--profile 20] [federated.py's flags]

On 2026-11-26 (H200, results/gpu/h200_2026-11-26/) the default preset's warm-ups ended at batch
losses of 0.29 (llm) and 1.1-1.7 (SLMs), every party then solved 0-3% of its test problems, and a
step took about 40 ms whatever the model's size; the same slm3 warm-up on a CPU in fp32 had loss
0.52 on the batch of step 150, where the H200 printed 1.78 (results/gpu/cpu_reference/).

This script runs the first `--steps` steps of a party's warm-up, with the data, seed,
initialization, batch order and learning-rate schedule of that run, under each of: bf16 autocast +
Triton head (the default), bf16 + torch head, fp32 + Triton head, fp32 + torch head; it prints
the mean batch loss of each block of 50 steps and the milliseconds per step. After the default
mode it generates greedy paths for `--eval` validation problems in one left-padded batch and one
by one (they should agree). Then (`--profile N`) it profiles N steps of the default mode and prints
the ops that take the most GPU and CPU time. `--device cpu --modes fp32-torch` gives the CPU
reference of the losses. `--grads` takes the first mode's last batch and compares its loss and
gradients in fp32 with those under bf16 autocast, and under bf16 with SDPA held to each backend.

Found on 2026-11-26, 21:48 UTC (H200, results/gpu/h200_2026-11-26b/): bf16 autocast is the gap
(slm3, steps 101-150: mean loss 1.83 under bf16 with either head, 0.69 in fp32 with either head),
and bf16 steps are 4-5x slower. On the CPU, `--device cpu --parties slm3 --modes fp32-torch
--steps 30 --eval 0 --profile 0 --grads` gives, for bf16 autocast with any SDPA backend there,
loss 2.0110 against fp32's 2.0111 and a gradient cosine of 0.999995 (results/gpu/cpu_reference/
grads_cpu.log); the same line on the GPU says which op breaks there.
"""

import argparse
import contextlib
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import distill  # noqa: E402
import eval as ev  # noqa: E402
import config as C  # noqa: E402
import parties as F  # noqa: E402

MODES = {"bf16-triton": ("bf16", "triton"), "bf16-torch": ("bf16", "torch"),
         "fp32-triton": ("fp32", "triton"), "fp32-torch": ("fp32", "torch"),
         "fp32-auto": ("fp32", ""), "bf16-auto": ("bf16", "")}  # "": the head kernels.kernel_backend picks by size


class Stop(Exception):
    pass


def sync(cfg):
    if cfg["device"].startswith("cuda"):
        torch.cuda.synchronize()


def first_steps(cfg, splits, name, steps, dtype, kernel):
    """(losses of the first `steps` warm-up steps of party `name`, ms per step over steps 2..steps,
    model, tokenizer, the last batch): the real warm_up (distill.warm_up via federated.build_parties), stopped early."""
    os.environ["LADA_KERNEL"] = kernel
    losses, times, held = [], [], {}
    sft, warm_up = distill.sft_loss, F.warm_up

    def recording(model, enc):
        held["enc"] = enc
        if len(losses) in (1, steps - 1):  # time steps 2..steps (the first compiles kernels)
            sync(cfg)
            times.append(time.time())
        loss = sft(model, enc)
        losses.append(loss.detach())
        return loss

    def stop_at(point):
        if len(losses) >= steps:
            raise Stop

    def holding(model, tokenizer, *args, **kw):
        held.update(model=model, tok=tokenizer)
        return warm_up(model, tokenizer, *args, **kw)

    crash_point = distill.crash_point
    # each name patched where it is used: warm_up calls sft_loss and crash_point in distill; parties calls warm_up
    distill.sft_loss, distill.crash_point, F.warm_up = recording, stop_at, holding
    cfg = dict(cfg, dtype=dtype, cache=os.path.join(cfg["cache"], f"{dtype}-{kernel}-{time.time_ns()}"),
               rewarm=True)  # a warm-up, never a shipped base (bases/)
    try:
        with distill.autocast(cfg["device"], dtype):
            F.build_parties(cfg, splits, only=[name])
    except Stop:
        pass
    finally:
        distill.sft_loss, distill.crash_point, F.warm_up = sft, crash_point, warm_up
    ms = (times[-1] - times[0]) / max(1, steps - 2) * 1e3 if len(times) == 2 else float("nan")
    return [float(x) for x in torch.stack(losses).cpu()], ms, held["model"], held["tok"], held.get("enc")


def grad_check(cfg, model, enc):
    """One batch, one model: loss and gradients under fp32, bf16 autocast, and bf16 autocast with
    SDPA held to each backend; per mode the loss, the cosine of the whole gradient with fp32's, and
    the parameters whose gradients agree least (cosine, norm ratio). Names the op that bf16 breaks."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    dev = torch.device(cfg["device"]).type
    modes = {"fp32": (False, None), "bf16": (True, None), "bf16 sdpa=math": (True, SDPBackend.MATH),
             "bf16 sdpa=efficient": (True, SDPBackend.EFFICIENT_ATTENTION),
             "bf16 sdpa=flash": (True, SDPBackend.FLASH_ATTENTION)}
    model.train()
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    ref = None
    for label, (bf16, backend) in modes.items():
        model.zero_grad(set_to_none=True)
        try:
            with torch.autocast(dev, dtype=torch.bfloat16, enabled=bf16), \
                    (sdpa_kernel(backend) if backend is not None else contextlib.nullcontext()):
                loss = distill.sft_loss(model, enc)
            loss.backward()
        except RuntimeError as e:  # a backend that cannot run these shapes
            print(f"  {label:>20}: cannot run ({str(e).splitlines()[0][:100]})", flush=True)
            continue
        grads = {n: p.grad.detach().double().flatten() for n, p in params if p.grad is not None}
        if ref is None:
            ref = grads
        flat = torch.cat([grads[n] for n in ref]), torch.cat([ref[n] for n in ref])
        cos = float(torch.nn.functional.cosine_similarity(*flat, dim=0))
        worst = sorted((float(torch.nn.functional.cosine_similarity(grads[n], ref[n], dim=0)), n,
                        float(grads[n].norm() / ref[n].norm().clamp_min(1e-30))) for n in ref)[:4]
        print(f"  {label:>20}: loss {loss.item():.4f}, gradient cosine with fp32 {cos:.6f}; least alike: "
              + ", ".join(f"{n} ({c:.5f}, x{r:.3f})" for c, n, r in worst), flush=True)
    model.zero_grad(set_to_none=True)


def padding_check(cfg, splits, name, model, tok, n):
    """Greedy paths of n validation problems in one left-padded batch and one by one."""
    probs = (splits["public_val"] if name == "llm" else splits["clients"][int(name[3:]) - 1]["val"])[:n]
    prompts = [ev.format_prompt(p["question"]) for p in probs]
    with distill.autocast(cfg["device"], cfg["dtype"]):
        batched = ev.generate(model, tok, prompts, max_new_tokens=cfg["max_new_tokens"], batch_size=n, device=cfg["device"])
        single = [ev.generate(model, tok, [q], max_new_tokens=cfg["max_new_tokens"], batch_size=1, device=cfg["device"])[0]
                  for q in prompts]
    same = sum(a == b for a, b in zip(batched, single))
    correct = lambda paths: sum(ev.is_correct(y, p["answer"]) for y, p in zip(paths, probs))  # noqa: E731
    print(f"{name} generation: {same}/{n} paths equal batched and one by one; correct {correct(batched)} vs "
          f"{correct(single)} of {n}; first path one by one: {single[0][:160]!r}", flush=True)


def profile(cfg, splits, name, steps):
    from torch.profiler import ProfilerActivity, profile as prof
    cuda = cfg["device"].startswith("cuda")
    with prof(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as p:
        first_steps(cfg, splits, name, steps, cfg["dtype"], "")  # the run's own precision and head
    print(p.key_averages().table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=25))
    print(p.key_averages().table(sort_by="cpu_time_total", row_limit=15))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parties", default="slm3,llm")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--preset", default="default", help="federated.py's size preset (cpu: the CPU preset's warm-ups)")
    ap.add_argument("--eval", type=int, default=32, help="problems for the padding check (0: none)")
    ap.add_argument("--profile", type=int, default=20, help="steps to profile (0: none)")
    ap.add_argument("--cache", default="/tmp/diagnose_cache")
    ap.add_argument("--grads", action="store_true",
                    help="after each party's first mode, compare its last batch's gradients in fp32 and bf16")
    args, run_flags = ap.parse_known_args()  # the rest are federated.py's flags, e.g. --warm_batch 256 --warm_lr 6e-3
    cfg = C.resolve_config(C.parse_args(["--scenario", "hetero", "--preset", args.preset, "--device", args.device,
                                         "--cache", args.cache, *run_flags]))
    splits = F.make_data(cfg, 3)
    for name in args.parties.split(","):
        for mode in args.modes.split(","):
            losses, ms, model, tok, last_batch = first_steps(cfg, splits, name, args.steps, *MODES[mode])
            blocks = [sum(losses[i:i + 50]) / len(losses[i:i + 50]) for i in range(0, len(losses), 50)]
            print(f"{name} {mode:>11}: {ms:6.1f} ms/step (steps 2-{len(losses)}); "
                  f"mean loss per 50 steps: {' '.join(f'{b:.3f}' for b in blocks)}", flush=True)
            if args.grads and mode == args.modes.split(",")[0]:
                print(f"{name} after {len(losses)} {mode} steps, its last batch:", flush=True)
                grad_check(cfg, model, last_batch)
            if args.eval and mode == args.modes.split(",")[0]:
                padding_check(cfg, splits, name, model, tok, args.eval)
        if args.profile:
            profile(cfg, splits, name, args.profile)


if __name__ == "__main__":
    main()
