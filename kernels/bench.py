"""Benchmark of the fused LM-head kernels (kernels/) against their peers.

    python -m kernels.bench --shapes small                       # CPU: torch paths, ~1 min
    TRITON_INTERPRET=1 python -m kernels.bench --shapes small    # + interpreted Triton, tiny shape
    python -m kernels.bench --shapes paper                       # CUDA, bf16: the three LM-head shapes

Providers, all computing per-sequence Σ_t log p(label_t) for (tokens, vocab, hidden) = (N, V, d)
in rows of T = min(1024, N/8) tokens (every label kept, so FLOPs compare across providers), then the
gradient of Σ_b g_b · logp_b for a random g:
  triton      kernels.seq_logprob: online log-sum-exp forward, backward in vocabulary chunks
  triton_lean the same with LADA_KERNEL_BACKWARD=lean: grad_hidden token slice by token slice
              (extra memory a quarter or less; one more pass over the logits, 10NVd in all)
  triton_dard kernels.dard_loss_fused on the same rows read as B y⁺ then B y⁻ (loss, then its gradient)
  triton_dard_w0  the same batch as imitation only (spec §4': every pair w = 0): the y⁻ rows are skipped,
              so it should cost about half of triton_dard (FLOPs still counted over all rows)
  torch_ref   seq_logprob_reference: chunked, checkpointed torch (the CPU path)
  eager       materialized logits: (h @ Wᵀ).float() -> log_softmax -> gather (what HF does)
  compile     torch.compile(eager)
  liger       liger_kernel's fused linear cross-entropy, reduction="none"
  cce         cut_cross_entropy.linear_cross_entropy, reduction="none", its default gradient
              filter (skips d_logits tiles below bf16 resolution: approximate, data dependent)
  cce_exact   the same with filter_eps=None (every tile computed, as the other providers do)
Per provider: median time of fwd, bwd (backward alone) and fwd+bwd; peak memory of fwd+bwd above
the inputs, and that peak minus the gradients themselves ("extra"); TFLOP/s counting 2NVd for the
forward and 8NVd for forward+backward (recomputed logits), and their fraction of the measured bf16
matmul peak (CUDA); errors against float64 on the same rounded inputs: max abs error of the
per-sequence log-probs, relative L2 error of the hidden and weight gradients.
Results go to a CSV (--out) with device, versions, date and commit; kernels/BENCH.md records an
H100 run (raw rows in results/kernels/).
"""

import argparse
import csv
import datetime
import importlib
import os
import subprocess
import time
from unittest import mock

import torch

from .dard_loss import _DardLossFunction, dard_loss_reference, mask_imitation_rows
from .seq_logprob import _INTERPRETED, HAS_TRITON, _SeqLogprobFunction, seq_logprob_reference, triton

_slp = importlib.import_module(__package__ + ".seq_logprob")  # the module (kernels.seq_logprob is the function)

SHAPES = {  # (tokens, vocab, hidden)
    "small": [(256, 4096, 128), (64, 512, 64)],  # CPU-sized; the second is for interpreted Triton
    "paper": [(8192, 151936, 896), (8192, 152064, 3584), (8192, 128256, 4096)],  # Qwen2-0.5B/7B, Llama-3-8B heads
}
SHAPES.update(dict(zip(["0.5b", "7b", "8b"], ([s] for s in SHAPES["paper"]))))  # one paper shape each
SHAPES["all"] = SHAPES["small"] + SHAPES["paper"]
PROVIDERS = ["triton", "triton_lean", "triton_dard", "triton_dard_w0", "torch_ref", "eager", "compile", "liger", "cce", "cce_exact"]
INTERPRET_MAX_WORK = 2**22  # N·V·d above which interpreted Triton is skipped (minutes per call)
BETA, ALPHA = 0.1, 0.1  # DARD constants for triton_dard (spec §4 defaults)


def eager_seq_logprob(hidden, weight, labels):
    """Materialized (B, T, V) logits, as a transformers model computes them."""
    logits = (hidden @ weight.T).float()
    logp = torch.log_softmax(logits, dim=-1).gather(-1, labels.clamp_min(0)[..., None]).squeeze(-1)
    return (logp * (labels != -100)).sum(1)


def make_provider(name, device, dard):
    """fn(hidden, weight, labels) -> (B,) fp32 per-sequence log-probs (for triton_dard: the loss),
    or a string saying why it cannot run. `dard` holds triton_dard's fixed ref_logps and q."""
    if name in ("triton", "triton_dard", "triton_dard_w0", "triton_lean"):
        if not HAS_TRITON:
            return "triton not importable"
        if device.type != "cuda" and not _INTERPRETED:
            return "CPU without TRITON_INTERPRET=1"
        if name == "triton":
            return lambda h, w, y: _SeqLogprobFunction.apply(h, w, y, -100, None)
        if name == "triton_lean":  # the forward records the backward to run: LADA_KERNEL_BACKWARD=lean
            def lean(h, w, y):
                with mock.patch.dict(os.environ, LADA_KERNEL_BACKWARD="lean"):
                    return _SeqLogprobFunction.apply(h, w, y, -100, None)
            return lean
        if name == "triton_dard_w0":  # imitation only: the kernel's own masking of the y⁻ rows (mask_imitation_rows)
            return lambda h, w, y: _DardLossFunction.apply(h, w, mask_imitation_rows(y, dard["w0"]), dard["ref"], dard["q"],
                                                           BETA, ALPHA, -100, None, dard["w0"])[0]
        return lambda h, w, y: _DardLossFunction.apply(h, w, y, dard["ref"], dard["q"], BETA, ALPHA, -100, None, None)[0]
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
        if name in ("cce", "cce_exact"):
            from cut_cross_entropy import linear_cross_entropy

            eps = {} if name == "cce" else dict(filter_eps=None)

            def cce(h, w, y):  # row sums by a product: CCE's backward views its gradient, which must be dense
                loss = linear_cross_entropy(h, w, y, reduction="none", **eps).float().view(y.shape)
                return -(loss @ torch.ones(y.shape[1], 1, device=loss.device)).squeeze(1)

            return cce
    except ImportError as e:
        return f"not installed ({e.name})"
    raise ValueError(f"unknown provider {name}")


def f64_reference(hidden, weight, labels, grad_out, dard):
    """float64 truths on the same rounded inputs: per-sequence log-probs, and the hidden / weight
    gradients of Σ g·logp and of the DARD loss. Computed in token chunks on the inputs' device."""
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    logp = seq_logprob_reference(h, w, labels)
    logp.backward(grad_out.double())
    ref = dict(logp=logp.detach(), seq=(h.grad, w.grad))
    h.grad = w.grad = None
    loss, _ = dard_loss_reference(h, w, labels, dard["ref"].double(), dard["q"].double(), BETA, ALPHA)
    loss.backward()
    ref["dard"] = (h.grad, w.grad)
    h.grad = w.grad = None
    loss, _ = dard_loss_reference(h, w, labels, dard["ref"].double(), dard["q"].double(), BETA, ALPHA, w=dard["w0"])
    loss.backward()
    ref["dard_w0"] = (h.grad, w.grad)
    return ref


def rel_err(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


def timed(fn, device, reps, setup=lambda: None, reset=lambda: None):
    """Median time (ms) of fn(setup()) over `reps` runs after a warm-up (setup untimed), and the
    peak memory (MB) above what was allocated before the runs (CUDA only), taken after reset()
    (which drops what the warm-up left behind, e.g. gradients)."""
    fn(setup())
    reset()
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


def matmul_peak(device, reps=20, n=8192):
    """Measured bf16 matmul rate (TFLOP/s) of an n×n×n product through torch (cuBLAS), random data."""
    if device.type != "cuda":
        return float("nan")
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    t, _ = timed(lambda _: a @ b, device, reps)
    return 2 * n**3 / t / 1e9


def make_inputs(shape, dtype, device, seq_len=1024):
    N, V, d = shape
    T = min(seq_len, max(1, N // 8))  # at least 8 rows, so triton_dard has 4 pairs
    g = torch.Generator(device="cpu").manual_seed(0)
    hidden = torch.randn(N // T, T, d, generator=g).to(device, dtype).requires_grad_()
    weight = (torch.randn(V, d, generator=g) / d**0.5).to(device, dtype).requires_grad_()
    labels = torch.randint(0, V, (N // T, T), generator=g).to(device)
    grad_out = torch.randn(N // T, generator=g).to(device)
    B = max(1, N // T // 2)  # triton_dard: rows 0..B-1 are y⁺, B..2B-1 y⁻
    dard = dict(ref=(-float(T) * 12 + torch.randn(2 * B, generator=g)).to(device), q=torch.rand(B, generator=g).to(device),
                w0=torch.zeros(B, device=device))
    return hidden, weight, labels, grad_out, dard


def bench_one(name, inputs, ref, device, reps, peak_tflops):
    hidden, weight, labels, grad_out, dard = inputs
    (R, T, d), V = hidden.shape, weight.shape[0]
    N = R * T
    row = dict(provider=name, tokens=N, vocab=V, hidden=d, dtype=str(hidden.dtype).split(".")[-1])
    if name.startswith("triton_dard") and R % 2:
        return dict(row, note="needs an even number of rows")
    fn = make_provider(name, device, dard)
    if isinstance(fn, str):
        return dict(row, note=fn)
    if name.startswith("triton") and device.type != "cuda" and N * V * d > INTERPRET_MAX_WORK:
        return dict(row, note="interpreted: shape too large")
    is_loss = name.startswith("triton_dard")
    g = torch.ones((), device=device) if is_loss else grad_out

    def drop_grads():
        hidden.grad = weight.grad = None

    def fwd(_=None):
        drop_grads()
        return fn(hidden, weight, labels)

    try:
        out = fwd()
        out.backward(g)
        gh_ref, gw_ref = ref[name[len("triton_"):] if is_loss else "seq"]
        frozen = not weight.requires_grad  # --frozen: the head as under LoRA, no weight gradient
        if frozen and weight.grad is not None:
            raise RuntimeError("a frozen weight got a gradient")
        err = dict(grad_h_rel_err=rel_err(hidden.grad, gh_ref),
                   grad_w_rel_err=float("nan") if frozen else rel_err(weight.grad, gw_ref))
        if not is_loss:
            err["logp_max_abs_err"] = (out.detach().double() - ref["logp"]).abs().max().item()
        grad_mb = sum(t.grad.numel() * t.grad.element_size() for t in (hidden, weight) if t.grad is not None) / 2**20
        drop_grads()
        del out
        t_f, m_f = timed(fwd, device, reps, reset=drop_grads)
        t_b, _ = timed(lambda out: out.backward(g), device, reps, setup=fwd)
        t_fb, m_fb = timed(lambda _: fwd().backward(g), device, reps, reset=drop_grads)
    except torch.OutOfMemoryError:
        return dict(row, note="OOM")
    except Exception as e:  # a peer's API change or a compiler failure: report, keep going
        return dict(row, note=f"{type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}")
    finally:
        drop_grads()
    flop = N * V * d  # fwd+bwd counted as 8·N·V·d (6 with a frozen head: no weight-gradient product)
    tf_f, tf_fb = 2 * flop / t_f / 1e9, (6 if frozen else 8) * flop / t_fb / 1e9
    return dict(row, fwd_ms=t_f, bwd_ms=t_b, fwdbwd_ms=t_fb, fwd_peak_mb=m_f, fwdbwd_peak_mb=m_fb,
                extra_mb=m_fb - grad_mb, grad_mb=grad_mb, fwd_tflops=tf_f, fwdbwd_tflops=tf_fb,
                fwd_peak_frac=tf_f / peak_tflops, fwdbwd_peak_frac=tf_fb / peak_tflops, **err, note="")


def set_blocks(spec):
    """--blocks BT,BV,BD,warps,stages: override the 16-bit CUDA launch config of kernels/ (a sweep aid)."""
    BT, BV, BD, warps, stages = (int(x) for x in spec.split(","))
    # read at every launch (a copy per launch), from both kernels' wrappers
    _slp.CUDA_CONFIGS["16-bit"].update(BLOCK_T=BT, BLOCK_V=BV, BLOCK_D=BD, num_warps=warps, num_stages=stages)


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
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions (median taken; default 10, 5 for paper)")
    ap.add_argument("--blocks", default=None, help="BT,BV,BD,warps,stages for the 16-bit Triton launches")
    ap.add_argument("--frozen", action="store_true",
                    help="the head's weight without gradient (as under LoRA): backward computes grad_hidden only")
    # where results go
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "bench_results.csv"), help="CSV path")
    args = ap.parse_args()
    print(vars(args))
    if args.blocks:
        set_blocks(args.blocks)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    reps = args.reps or (5 if args.shapes == "paper" else 10)
    peak = matmul_peak(device)
    meta = dict(
        device=torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)",
        torch=torch.__version__,
        triton=getattr(triton, "__version__", "none") + (" (interpreted)" if _INTERPRETED else ""),
        date=datetime.datetime.now().isoformat(timespec="seconds"), commit=git_commit(),
        blocks=args.blocks or "default", matmul_tflops=round(peak, 1), frozen_head=args.frozen,
    )
    print(meta)
    rows = []
    for shape in SHAPES[args.shapes]:
        if device.type == "cpu" and shape[0] * shape[1] > 2**24:
            print(f"skip {shape}: too large for CPU")
            continue
        inputs = make_inputs(shape, dtype, device)
        ref = f64_reference(*inputs[:4], inputs[4])
        if args.frozen:
            inputs[1].requires_grad_(False)
        for name in args.providers.split(","):
            rows.append(dict(meta, **bench_one(name.strip(), inputs, ref, device, reps, peak)))
            r = rows[-1]
            fmt = lambda k, f: format(r[k], f) if k in r else "-"  # noqa: E731
            print(f"{r['provider']:>11} {str(shape):>20} {r['dtype']:>8} fwd {fmt('fwd_ms', '8.2f')} ms"
                  f"  bwd {fmt('bwd_ms', '8.2f')}  f+b {fmt('fwdbwd_ms', '8.2f')} ms"
                  f"  peak {fmt('fwdbwd_peak_mb', '8.1f')} MB extra {fmt('extra_mb', '8.1f')}"
                  f"  {fmt('fwd_tflops', '6.1f')}/{fmt('fwdbwd_tflops', '6.1f')} TFLOP/s"
                  f" ({fmt('fwd_peak_frac', '.2f')}/{fmt('fwdbwd_peak_frac', '.2f')})"
                  f"  err logp {fmt('logp_max_abs_err', '.1e')} gh {fmt('grad_h_rel_err', '.1e')}"
                  f" gw {fmt('grad_w_rel_err', '.1e')}  {r.get('note', '')}", flush=True)
        del inputs, ref
        if device.type == "cuda":
            torch.cuda.empty_cache()
    fields = list(meta) + ["provider", "tokens", "vocab", "hidden", "dtype", "fwd_ms", "bwd_ms", "fwdbwd_ms",
                           "fwd_peak_mb", "fwdbwd_peak_mb", "grad_mb", "extra_mb", "fwd_tflops", "fwdbwd_tflops",
                           "fwd_peak_frac", "fwdbwd_peak_frac", "logp_max_abs_err", "grad_h_rel_err",
                           "grad_w_rel_err", "note"]
    tmp = args.out + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
