"""Benchmark of the fused per-sequence log-prob (kernels/seq_logprob.py) against its peers.

    python -m kernels.bench --shapes small                       # CPU: torch paths, ~1 min
    TRITON_INTERPRET=1 python -m kernels.bench --shapes small    # + interpreted Triton, tiny shape
    python -m kernels.bench --shapes paper --dtype bf16          # CUDA: the three LM-head shapes

Providers, all computing per-sequence Σ_t log p(label_t) for (tokens, vocab, hidden) =
(N, V, d), in rows of T = 1024 tokens (every label kept, so FLOPs compare across providers):
  triton     the fused kernels (online log-sum-exp forward, recomputing atomic backward)
  torch_ref  seq_logprob_reference: chunked, checkpointed torch (the CPU path)
  eager      materialized logits: (h @ Wᵀ).float() -> log_softmax -> gather (what HF does)
  compile    torch.compile(eager)
  liger      liger_kernel's fused linear cross-entropy, reduction="none" (computes the gradient
             in its forward, so its "bwd" is near zero: compare fwd+bwd)
  cce        cut_cross_entropy.linear_cross_entropy, reduction="none"
Reports the median time of fwd, bwd (backward alone, on a fresh graph each run) and fwd+bwd,
peak memory above the inputs (CUDA only), TFLOP/s (2NVd forward, 8NVd forward+backward) and
the max abs error of the per-sequence log-probs against a float64 reference computed in token
chunks. Results go to a CSV (--out) with device, versions, date and commit; don't commit them.
"""

import argparse
import csv
import datetime
import os
import subprocess
import time

import torch

from .seq_logprob import _INTERPRETED, HAS_TRITON, _SeqLogprobFunction, seq_logprob_reference, triton

SHAPES = {  # (tokens, vocab, hidden)
    "small": [(256, 4096, 128), (64, 512, 64)],  # CPU-sized; the second is for interpreted Triton
    "paper": [(8192, 151936, 896), (8192, 152064, 3584), (8192, 128256, 4096)],  # Qwen2-0.5B/7B, Llama-3-8B heads
}
SHAPES["all"] = SHAPES["small"] + SHAPES["paper"]
PROVIDERS = ["triton", "torch_ref", "eager", "compile", "liger", "cce"]
INTERPRET_MAX_WORK = 2**22  # N·V·d above which interpreted Triton is skipped (minutes per call)


def eager_seq_logprob(hidden, weight, labels):
    """Materialized (B, T, V) logits, as a transformers model computes them."""
    logits = (hidden @ weight.T).float()
    logp = torch.log_softmax(logits, dim=-1).gather(-1, labels.clamp_min(0)[..., None]).squeeze(-1)
    return (logp * (labels != -100)).sum(1)


def make_provider(name, device):
    """fn(hidden, weight, labels) -> (B,) fp32 per-sequence log-probs, or a reason it cannot run."""
    if name == "triton":
        if not HAS_TRITON:
            return "triton not importable"
        if device.type != "cuda" and not _INTERPRETED:
            return "CPU without TRITON_INTERPRET=1"
        return lambda h, w, y: _SeqLogprobFunction.apply(h, w, y, -100)
    if name == "torch_ref":
        return seq_logprob_reference
    if name == "eager":
        return eager_seq_logprob
    if name == "compile":
        return torch.compile(eager_seq_logprob)
    if device.type != "cuda":
        return "CUDA only"
    try:
        if name == "liger":
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

            ce = LigerFusedLinearCrossEntropyLoss(reduction="none")

            def liger(h, w, y):
                out = ce(w, h.reshape(-1, h.shape[-1]), y.reshape(-1))
                return -(out[0] if isinstance(out, tuple) else out).float().view(y.shape).sum(1)

            return liger
        if name == "cce":
            from cut_cross_entropy import linear_cross_entropy

            return lambda h, w, y: -linear_cross_entropy(h, w, y, reduction="none").float().view(y.shape).sum(1)
    except ImportError as e:
        return f"not installed ({e.name})"
    raise ValueError(f"unknown provider {name}")


@torch.no_grad()
def logprob_f64(hidden, weight, labels, chunk=1024):
    """float64 per-sequence log-probs, `chunk` rows of tokens at a time."""
    B, T, d = hidden.shape
    w64, h, y = weight.double(), hidden.reshape(-1, d), labels.reshape(-1)
    out = torch.empty(h.shape[0], dtype=torch.float64, device=h.device)
    for i in range(0, h.shape[0], chunk):
        logits = h[i : i + chunk].double() @ w64.T
        out[i : i + chunk] = logits.gather(1, y[i : i + chunk, None]).squeeze(1) - torch.logsumexp(logits, -1)
    return out.view(B, T).sum(1)


def timed(fn, device, reps, setup=lambda: None):
    """Median time (ms) of fn(setup()) over `reps` runs after a warm-up (setup untimed), and the
    peak memory (MB) above what was allocated before the runs (CUDA only)."""
    fn(setup())
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    base = torch.cuda.memory_allocated() if cuda else 0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(reps):
        arg = setup()
        sync()
        t0 = time.perf_counter()
        fn(arg)
        sync()
        times.append(1e3 * (time.perf_counter() - t0))
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else float("nan")
    return sorted(times)[len(times) // 2], peak


def bench_one(name, shape, dtype, device, reps, seq_len=1024):
    N, V, d = shape
    row = dict(provider=name, tokens=N, vocab=V, hidden=d, dtype=str(dtype).split(".")[-1])
    fn = make_provider(name, device)
    if isinstance(fn, str):
        return dict(row, note=fn)
    if name == "triton" and device.type != "cuda" and N * V * d > INTERPRET_MAX_WORK:
        return dict(row, note="interpreted: shape too large")
    T = min(N, seq_len)
    g = torch.Generator(device="cpu").manual_seed(0)
    hidden = torch.randn(N // T, T, d, generator=g).to(device, dtype).requires_grad_()
    weight = (torch.randn(V, d, generator=g) / d**0.5).to(device, dtype).requires_grad_()
    labels = torch.randint(0, V, (N // T, T), generator=g).to(device)
    grad_out = torch.randn(N // T, device=device)

    def fwd(_=None):
        hidden.grad = weight.grad = None
        return fn(hidden, weight, labels)

    try:
        out = fwd().detach()
        err = (out.double() - logprob_f64(hidden.detach(), weight.detach(), labels)).abs().max().item()
        t_f, m_f = timed(fwd, device, reps)
        t_b, _ = timed(lambda out: out.backward(grad_out), device, reps, setup=fwd)
        t_fb, m_fb = timed(lambda _: fwd().backward(grad_out), device, reps)
    except torch.OutOfMemoryError:
        return dict(row, note="OOM")
    except Exception as e:  # a peer's API change or a compiler failure: report, keep going
        return dict(row, note=f"{type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}")
    finally:
        hidden.grad = weight.grad = None
    flop = N * V * d
    return dict(row, fwd_ms=t_f, bwd_ms=t_b, fwdbwd_ms=t_fb, fwd_peak_mb=m_f, fwdbwd_peak_mb=m_fb,
                fwd_tflops=2 * flop / t_f / 1e9, fwdbwd_tflops=8 * flop / t_fb / 1e9, max_abs_err=err, note="")


def git_commit():
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        sha = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=root, text=True).strip()
        dirty = subprocess.check_output(["git", "status", "--porcelain", "--", "kernels"], cwd=root, text=True).strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # what to run
    ap.add_argument("--shapes", choices=sorted(SHAPES), default="small", help="(tokens, vocab, hidden) set")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="dtype of hidden and weight")
    ap.add_argument("--providers", default=",".join(PROVIDERS), help="comma-separated subset of the default")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions (median taken)")
    # where results go
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "bench_results.csv"), help="CSV path")
    args = ap.parse_args()
    print(vars(args))

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    reps = args.reps or 10
    meta = dict(
        device=torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)",
        torch=torch.__version__,
        triton=getattr(triton, "__version__", "none") + (" (interpreted)" if _INTERPRETED else ""),
        date=datetime.datetime.now().isoformat(timespec="seconds"), commit=git_commit(),
    )
    print(meta)
    rows = []
    for shape in SHAPES[args.shapes]:
        if device.type == "cpu" and shape[0] * shape[1] > 2**24:
            print(f"skip {shape}: too large for CPU")
            continue
        for name in args.providers.split(","):
            rows.append(dict(meta, **bench_one(name.strip(), shape, dtype, device, reps)))
            r = rows[-1]
            fmt = lambda k, f: format(r[k], f) if k in r else "-"  # noqa: E731
            print(f"{r['provider']:>10} {str(shape):>22} {r['dtype']:>8} fwd {fmt('fwd_ms', '9.2f')} ms"
                  f"  bwd {fmt('bwd_ms', '9.2f')} ms  f+b {fmt('fwdbwd_ms', '9.2f')} ms"
                  f"  peak {fmt('fwdbwd_peak_mb', '8.1f')} MB  {fmt('fwdbwd_tflops', '7.2f')} TFLOP/s"
                  f"  err {fmt('max_abs_err', '.2e')}  {r.get('note', '')}")
    fields = list(meta) + ["provider", "tokens", "vocab", "hidden", "dtype", "fwd_ms", "bwd_ms", "fwdbwd_ms",
                           "fwd_peak_mb", "fwdbwd_peak_mb", "fwd_tflops", "fwdbwd_tflops", "max_abs_err", "note"]
    with open(args.out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
