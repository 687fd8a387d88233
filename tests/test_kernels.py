"""kernels/: fused seq_logprob and DARD loss against float64 references and a hand-computed loss.

Without a GPU the Triton path runs in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1),
so shapes stay small; they are deliberately odd (V=173, d=37) so every block is partly masked.
"""

import importlib
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import kernels

seq_logprob_mod = importlib.import_module("kernels.seq_logprob")  # the module; kernels.seq_logprob is the function

IGNORE = -100
HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA"))]
BACKENDS = ["triton", "torch"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (atol, rtol) against float64 on the same (rounded) inputs: log-probs, then gradients
TOL = {
    torch.float32: ((1e-5, 1e-6), (1e-6, 1e-5)),
    torch.bfloat16: ((1e-4, 1e-5), (1e-2, 1e-2)),  # logits accumulate in fp32; d_logits, grads in bf16
    torch.float16: ((1e-4, 1e-5), (2e-3, 2e-3)),
}
# name: (B, T, V, d, mask) with mask "prompt" = first 3 labels of each row ignored,
# "row" = also row 1 fully ignored, "none" = nothing ignored
CASES = {
    "odd": (3, 12, 173, 37, "prompt"),  # 27 tokens: 2 token blocks, 3 vocab blocks, 3 d tiles
    "masked_row": (3, 5, 100, 24, "row"),
    "t1": (4, 1, 64, 48, "none"),  # T = 1
    "larger": (4, 16, 300, 48, "prompt"),  # 52 tokens: 4 token blocks, 5 vocab blocks
}


def use_backend(monkeypatch, backend, device):
    """Force a path through the public functions (and skip where it cannot run)."""
    if backend == "triton" and not (kernels.HAS_TRITON and (device == "cuda" or seq_logprob_mod._INTERPRETED)):
        pytest.skip("Triton path needs CUDA or TRITON_INTERPRET=1 before import")
    monkeypatch.setenv("LADA_KERNEL", backend)


def make_inputs(B, T, V, d, mask, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, d, generator=g, dtype=torch.float64)
    weight = 0.2 * torch.randn(V, d, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (B, T), generator=g)
    if mask in ("prompt", "row"):
        labels[:, : min(3, T - 1)] = IGNORE
    if mask == "row":
        labels[1] = IGNORE
    hidden, weight = hidden.to(dtype).to(device), weight.to(dtype).to(device)
    return hidden.requires_grad_(), weight.requires_grad_(), labels.to(device)


def logprob_f64(hidden, weight, labels):
    """Independent truth: materialized float64 log_softmax, masked sum over t. -> (B,) float64."""
    logp = torch.log_softmax(hidden.double() @ weight.double().T, dim=-1)  # (B, T, V)
    picked = logp.gather(-1, labels.clamp_min(0)[..., None]).squeeze(-1)
    return (picked * (labels != IGNORE)).sum(1)


def grads_f64(fn, hidden, weight):
    """fn(h64, w64) -> scalar, on float64 leaf copies; returns (dh, dw)."""
    h64 = hidden.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    fn(h64, w64).backward()
    return h64.grad, w64.grad


def assert_close(actual, expected, tol):
    torch.testing.assert_close(actual.double(), expected.double(), atol=tol[0], rtol=tol[1])


# -----------------------------------------------------------------------------
# seq_logprob


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).split(".")[-1])
@pytest.mark.parametrize("case", list(CASES))
def test_seq_logprob_matches_float64(case, dtype, backend, device, monkeypatch):
    use_backend(monkeypatch, backend, device)
    B, T, V, d, mask = CASES[case]
    hidden, weight, labels = make_inputs(B, T, V, d, mask, dtype, device)
    assert kernels.kernel_backend(hidden) == backend  # the path under test is the one that runs
    grad_out = torch.randn(B, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(device)

    out = kernels.seq_logprob(hidden, weight, labels, ignore_index=IGNORE)
    out.backward(grad_out.float())
    assert out.shape == (B,) and out.dtype == torch.float32
    assert hidden.grad.dtype == dtype and weight.grad.dtype == dtype

    expected = logprob_f64(hidden, weight, labels)
    dh, dw = grads_f64(lambda h, w: (logprob_f64(h, w, labels) * grad_out).sum(), hidden, weight)
    tol_out, tol_grad = TOL[dtype]
    assert_close(out, expected, tol_out)
    assert_close(hidden.grad, dh, tol_grad)
    assert_close(weight.grad, dw, tol_grad)
    if mask == "row":  # a fully masked row: exactly 0, and exactly zero gradient
        assert out[1].item() == 0.0
        assert torch.count_nonzero(hidden.grad[1]) == 0
    if mask in ("prompt", "row"):  # masked prompt tokens get no gradient either
        assert torch.count_nonzero(hidden.grad[:, :3]) == 0


def hand_kept(labels):
    """Flat indices b*T + t of the unmasked labels, by a loop over positions."""
    B, T = labels.shape
    return [b * T + t for b in range(B) for t in range(T) if labels[b, t].item() != IGNORE]


def check_seq_logprob_f64(hidden, weight, labels, dtype, **kw):
    """kernels.seq_logprob(**kw) and its gradients against float64, at TOL[dtype]."""
    out = kernels.seq_logprob(hidden, weight, labels, ignore_index=IGNORE, **kw)
    out.sum().backward()
    dh, dw = grads_f64(lambda h, w: logprob_f64(h, w, labels).sum(), hidden, weight)
    assert_close(out, logprob_f64(hidden, weight, labels), TOL[dtype][0])
    assert_close(hidden.grad, dh, TOL[dtype][1])
    assert_close(weight.grad, dw, TOL[dtype][1])
    hidden.grad = weight.grad = None


def check_dard_f64(hidden, weight, labels, dtype, **kw):
    """kernels.dard_loss_fused(**kw) on rows [B y⁺, B y⁻]: its log-probs, loss and gradients against float64."""
    B, device = hidden.shape[0] // 2, hidden.device
    ref, q = torch.full((2 * B,), -30.0, device=device), torch.linspace(0.1, 0.9, B, device=device)
    loss, logps = kernels.dard_loss_fused(hidden, weight, labels, ref, q, 0.5, 0.3, ignore_index=IGNORE, **kw)
    loss.backward()
    expected, expected_logps = dard_f64(hidden, weight, labels, ref, q, 0.5, 0.3)
    dh, dw = grads_f64(lambda h, w: dard_f64(h, w, labels, ref, q, 0.5, 0.3)[0], hidden, weight)
    assert_close(logps, expected_logps, TOL[dtype][0])
    assert_close(loss, expected, (1e-5, 1e-5) if dtype == torch.float32 else (1e-3, 1e-3))
    assert_close(hidden.grad, dh, TOL[dtype][1])
    assert_close(weight.grad, dw, TOL[dtype][1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["odd", "masked_row"])
def test_token_indices_found_on_the_host_give_the_float64_result(case, backend, device, monkeypatch):
    """tok= (the unmasked positions, found where the batch is built: batching.collate) replaces the
    device-side search; log-probs, DARD loss and gradients still match float64."""
    use_backend(monkeypatch, backend, device)
    B, T, V, d, mask = CASES[case]
    hidden, weight, labels = make_inputs(2 * B, T, V, d, mask, torch.float32, device, seed=11)
    tok = torch.tensor(hand_kept(labels.cpu()))  # on the host, as collate ships it
    assert kernels.kept_tokens(labels.cpu(), IGNORE).tolist() == tok.tolist()
    check_seq_logprob_f64(hidden, weight, labels, torch.float32, tok=tok)
    check_dard_f64(hidden, weight, labels, torch.float32, tok=tok)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda t: str(t).split(".")[-1])
@pytest.mark.parametrize("case", ["odd", "masked_row", "larger"])
def test_lean_backward_matches_float64(case, dtype, device, monkeypatch):
    """LADA_KERNEL_BACKWARD=lean (grad_weight in one vocabulary sweep, grad_hidden token slice by
    token slice): log-probs, DARD loss and both gradients against float64, within the fast path's
    tolerances; and it does run in slices."""
    use_backend(monkeypatch, "triton", device)
    monkeypatch.setenv("LADA_KERNEL_BACKWARD", "lean")
    calls = []
    real = seq_logprob_mod.triton_token_bwd
    monkeypatch.setattr(seq_logprob_mod, "triton_token_bwd", lambda *a, **k: calls.append(k) or real(*a, **k))
    B, T, V, d, mask = CASES[case]
    hidden, weight, labels = make_inputs(2 * B, T, V, d, mask, dtype, device, seed=13)
    n = int((labels != IGNORE).sum())
    check_seq_logprob_f64(hidden, weight, labels, dtype)
    assert len(calls) == 1 + math.ceil(n / math.ceil(n / seq_logprob_mod.LEAN_SLICES))  # one dw sweep, then the slices
    assert sum(not k["need_dw"] for k in calls) > 1
    check_dard_f64(hidden, weight, labels, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_lean_backward_frozen_weight(device, monkeypatch):
    use_backend(monkeypatch, "triton", device)
    monkeypatch.setenv("LADA_KERNEL_BACKWARD", "lean")
    hidden, weight, labels = make_inputs(2, 6, 90, 20, "prompt", torch.float32, device, seed=3)
    weight.requires_grad_(False)
    kernels.seq_logprob(hidden, weight, labels, ignore_index=IGNORE).sum().backward()
    dh, _ = grads_f64(lambda h, w: logprob_f64(h, w, labels).sum(), hidden, weight)
    assert weight.grad is None
    assert_close(hidden.grad, dh, TOL[torch.float32][1])
    monkeypatch.setenv("LADA_KERNEL_BACKWARD", "slow")
    with pytest.raises(ValueError, match="LADA_KERNEL_BACKWARD"):
        kernels.seq_logprob(hidden, weight, labels, ignore_index=IGNORE)


@pytest.mark.parametrize("device", DEVICES)
def test_seq_logprob_triton_frozen_weight_one_split(device, monkeypatch):
    """weight.requires_grad=False skips the weight gradient; num_splits=1 is the unsplit forward."""
    use_backend(monkeypatch, "triton", device)
    if device == "cpu":
        monkeypatch.setitem(seq_logprob_mod.INTERPRET_CONFIG, "num_splits", 1)
    hidden, weight, labels = make_inputs(2, 6, 90, 20, "prompt", torch.float32, device, seed=3)
    weight.requires_grad_(False)
    out = kernels.seq_logprob(hidden, weight, labels, ignore_index=IGNORE)
    out.sum().backward()
    dh, _ = grads_f64(lambda h, w: logprob_f64(h, w, labels).sum(), hidden, weight)
    assert weight.grad is None
    assert_close(out, logprob_f64(hidden, weight, labels), TOL[torch.float32][0])
    assert_close(hidden.grad, dh, TOL[torch.float32][1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_seq_logprob_mixed_dtypes(backend, device, monkeypatch):
    """bf16 activations with fp32 head weights (autocast-style): each gradient in its input's dtype."""
    use_backend(monkeypatch, backend, device)
    hidden, _, labels = make_inputs(2, 6, 90, 20, "prompt", torch.bfloat16, device, seed=8)
    _, weight, _ = make_inputs(2, 6, 90, 20, "prompt", torch.float32, device, seed=8)
    out = kernels.seq_logprob(hidden, weight, labels, ignore_index=IGNORE)
    out.sum().backward()
    assert hidden.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.float32
    w16 = weight.detach().bfloat16()  # the kernels run in the activations' dtype
    dh, dw = grads_f64(lambda h, w: logprob_f64(h, w, labels).sum(), hidden, w16)
    assert_close(out, logprob_f64(hidden, w16, labels), (1e-1, 1e-2))  # vs fp32 weights: bf16 rounding
    assert_close(hidden.grad, dh, TOL[torch.bfloat16][1])
    assert_close(weight.grad, dw, TOL[torch.bfloat16][1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda t: str(t).split(".")[-1])
def test_triton_backward_in_vocabulary_chunks(dtype, device, monkeypatch):
    """The backward walks the vocabulary in chunks (64 columns, rounded up to the block: 557 = 8 x 64
    + 45 interpreted and in fp32 on CUDA, 2 x 256 + 45 in bf16 on CUDA; the last one partial), each
    adding its share of grad_hidden (into an fp32 accumulator: addmm(out_dtype=) where the build has
    it) and writing its rows of grad_weight."""
    use_backend(monkeypatch, "triton", device)
    real_bwd = seq_logprob_mod.triton_token_bwd
    calls = []

    def bwd_in_chunks(*args, **kw):
        calls.append(1)
        return real_bwd(*args, **dict(kw, chunk_cols=64))

    monkeypatch.setattr(seq_logprob_mod, "triton_token_bwd", bwd_in_chunks)
    B, T, _, d, mask = CASES["odd"]
    hidden, weight, labels = make_inputs(B, T, 557, d, mask, dtype, device, seed=5)
    grad_out = torch.randn(B, generator=torch.Generator().manual_seed(6), dtype=torch.float64).to(device)
    kernels.seq_logprob(hidden, weight, labels, ignore_index=IGNORE).backward(grad_out.float())
    assert calls  # the chunked backward is the one that ran
    dh, dw = grads_f64(lambda h, w: (logprob_f64(h, w, labels) * grad_out).sum(), hidden, weight)
    assert_close(hidden.grad, dh, TOL[dtype][1])
    assert_close(weight.grad, dw, TOL[dtype][1])
    assert torch.count_nonzero(hidden.grad[:, :3]) == 0  # masked prompt tokens: exactly zero


@pytest.mark.skipif(not seq_logprob_mod._INTERPRETED, reason="on a GPU the CUDA variants run these configs compiled")
@pytest.mark.parametrize("kind,dtype", [("fp32", torch.float32), ("16-bit", torch.bfloat16)])
def test_cuda_launch_configs_in_the_interpreter(kind, dtype, monkeypatch):
    """The CUDA launch configs (their blocks, and vocabulary splits chosen for an H100/H200's 132
    SMs), run in the interpreter at a testbed party's head shape (d=80, V=640, partly masked): the
    logic of those block sizes and splits, which the interpreted tests above never use. d=80 and
    V=640 leave partial d tiles and vocabulary blocks for both configs."""
    use_backend(monkeypatch, "triton", "cpu")
    monkeypatch.setattr(seq_logprob_mod, "_base_config", lambda h2d: dict(seq_logprob_mod.CUDA_CONFIGS[kind]))
    monkeypatch.setattr(seq_logprob_mod, "_sm_count", lambda device: 132)
    splits = []
    monkeypatch.setattr(seq_logprob_mod, "_seq_logprob_fwd", _Recording(seq_logprob_mod._seq_logprob_fwd, splits))
    hidden, weight, labels = make_inputs(4, 50, 640, 80, "row", dtype, "cpu", seed=7)
    grad_out = torch.randn(4, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    out = kernels.seq_logprob(hidden, weight, labels, ignore_index=IGNORE)
    out.backward(grad_out.float())
    assert splits and splits[0] > 1  # the forward split the vocabulary, as on the GPU
    assert_close(out, logprob_f64(hidden, weight, labels), TOL[dtype][0])
    dh, dw = grads_f64(lambda h, w: (logprob_f64(h, w, labels) * grad_out).sum(), hidden, weight)
    assert_close(hidden.grad, dh, TOL[dtype][1])
    assert_close(weight.grad, dw, TOL[dtype][1])
    assert torch.count_nonzero(hidden.grad[1]) == 0  # the fully masked row: exactly zero


class _Recording:
    """A kernel handle that records the second grid dimension (the forward's vocabulary splits)."""

    def __init__(self, kernel, seen):
        self.kernel, self.seen = kernel, seen

    def __getitem__(self, grid):
        self.seen.append(grid[1])
        return self.kernel[grid]


def test_seq_logprob_reference_chunked():
    """The CPU path in several checkpointed chunks (27 tokens, 5 per chunk) matches float64."""
    hidden, weight, labels = make_inputs(*CASES["odd"], torch.float32, "cpu", seed=4)
    out = kernels.seq_logprob_reference(hidden, weight, labels, ignore_index=IGNORE, chunk_tokens=5)
    out.sum().backward()
    dh, dw = grads_f64(lambda h, w: logprob_f64(h, w, labels).sum(), hidden, weight)
    assert_close(out, logprob_f64(hidden, weight, labels), TOL[torch.float32][0])
    assert_close(hidden.grad, dh, TOL[torch.float32][1])
    assert_close(weight.grad, dw, TOL[torch.float32][1])


@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_seq_logprob_triton_never_holds_logits(monkeypatch):
    """Peak memory of forward+backward stays far below one fp32 (tokens, V) logit tensor."""
    use_backend(monkeypatch, "triton", "cuda")
    B, T, V, d = 8, 512, 32000, 128  # logits would be 524 MB in fp32; backward buffers ~7 MB
    hidden, weight, labels = make_inputs(B, T, V, d, "prompt", torch.bfloat16, "cuda")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    kernels.seq_logprob(hidden, weight, labels, ignore_index=IGNORE).sum().backward()
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base < 0.1 * B * T * V * 4


# -----------------------------------------------------------------------------
# DARD loss


def test_dard_loss_hand_computed():
    """1 pair, numbers worked by hand: h = 0.1·((−10+11) − (−12+11)) = 0.2."""
    logps = torch.tensor([-10.0, -12.0], dtype=torch.float64, requires_grad=True)
    ref, q = torch.tensor([-11.0, -11.0], dtype=torch.float64), torch.tensor([0.7], dtype=torch.float64)
    beta, alpha, n = 0.1, 0.1, torch.tensor([4])
    loss = kernels.dard_loss_from_logps(logps, ref, q, beta, alpha, n)
    sig = 1 / (1 + math.exp(-0.2))
    expected = -(0.7 * math.log(sig) + 0.3 * math.log(1 - sig)) + 0.1 * 10.0 / 4
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    loss.backward()  # ∂/∂lp⁺ = β(σ(h) − q) − α/n,  ∂/∂lp⁻ = −β(σ(h) − q)
    assert logps.grad.tolist() == pytest.approx([0.1 * (sig - 0.7) - 0.1 / 4, -0.1 * (sig - 0.7)], rel=1e-12)


def dard_f64(hidden, weight, labels, ref, q, beta, alpha):
    """Truth for the fused loss: float64 log-probs composed with the reference loss."""
    B = q.shape[0]
    logps = logprob_f64(hidden, weight, labels)
    n = (labels[:B] != IGNORE).sum(1)
    return kernels.dard_loss_from_logps(logps, ref.double(), q.double(), beta, alpha, n), logps


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda t: str(t).split(".")[-1])
@pytest.mark.parametrize("alpha_kind", ["float", "tensor"])
def test_dard_loss_fused_matches_float64(alpha_kind, dtype, backend, device, monkeypatch):
    use_backend(monkeypatch, backend, device)
    B, T, V, d, beta = 3, 7, 101, 29, 0.5
    hidden, weight, labels = make_inputs(2 * B, T, V, d, "prompt", dtype, device, seed=5)
    labels[B + 2] = IGNORE  # a fully masked y⁻ row
    g = torch.Generator().manual_seed(6)
    ref = (logprob_f64(hidden, weight, labels) + torch.randn(2 * B, generator=g).to(device)).float().detach()
    q = torch.tensor([0.9, 0.2, 1.0], device=device)
    alpha = 0.3 if alpha_kind == "float" else torch.tensor([0.3, 0.0, 1.5], device=device)
    grad_out = 0.7  # ≠ 1

    loss, logps = kernels.dard_loss_fused(hidden, weight, labels, ref, q, beta, alpha, ignore_index=IGNORE)
    (grad_out * loss).backward()
    assert loss.dim() == 0 and logps.shape == (2 * B,) and not logps.requires_grad
    assert logps[B + 2].item() == 0.0

    alpha64 = alpha if alpha_kind == "float" else alpha.double()
    expected, expected_logps = dard_f64(hidden, weight, labels, ref, q, beta, alpha64)
    dh, dw = grads_f64(lambda h, w: grad_out * dard_f64(h, w, labels, ref, q, beta, alpha64)[0], hidden, weight)
    assert_close(logps, expected_logps, TOL[dtype][0])
    assert_close(loss, expected, (1e-5, 1e-5))
    assert_close(hidden.grad, dh, TOL[dtype][1])
    assert_close(weight.grad, dw, TOL[dtype][1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_dard_loss_fused_one_pair_by_hand(backend, device, monkeypatch):
    """The fused loss equals the §4 formula evaluated by hand on the log-probs it returns."""
    use_backend(monkeypatch, backend, device)
    hidden, weight, labels = make_inputs(2, 6, 50, 16, "prompt", torch.float32, device, seed=7)
    ref, q, beta, alpha = torch.tensor([-20.0, -21.0], device=device), torch.tensor([0.25], device=device), 0.2, 0.1
    loss, logps = kernels.dard_loss_fused(hidden, weight, labels, ref, q, beta, alpha, ignore_index=IGNORE)
    lp_pos, lp_neg = logps.tolist()
    h = beta * ((lp_pos + 20.0) - (lp_neg + 21.0))
    log_sig = lambda x: -math.log1p(math.exp(-x))  # noqa: E731
    n_pos = 6 - 3
    expected = -(0.25 * log_sig(h) + 0.75 * log_sig(-h)) + alpha * (-lp_pos / n_pos)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


# -----------------------------------------------------------------------------
# dispatch and head check


def test_kernel_backend_dispatch(monkeypatch):
    x = torch.zeros(1)
    monkeypatch.delenv("LADA_KERNEL", raising=False)
    assert kernels.kernel_backend(x) == "torch"  # CPU runs the reference unless forced
    monkeypatch.setenv("LADA_KERNEL", "torch")
    assert kernels.kernel_backend(x) == "torch"
    monkeypatch.setenv("LADA_KERNEL", "cuda")
    with pytest.raises(ValueError):
        kernels.kernel_backend(x)
    if kernels.HAS_TRITON and seq_logprob_mod._INTERPRETED:
        monkeypatch.setenv("LADA_KERNEL", "triton")
        assert kernels.kernel_backend(x) == "triton"
    if HAS_CUDA and kernels.HAS_TRITON:
        monkeypatch.delenv("LADA_KERNEL")
        assert kernels.kernel_backend(x.cuda()) == "triton"
        # on a GPU the torch head takes batches whose logits are small; forcing still wins
        assert kernels.kernel_backend(x.cuda(), kernels.SMALL_HEAD_LOGITS) == "torch"
        assert kernels.kernel_backend(x.cuda(), kernels.SMALL_HEAD_LOGITS + 1) == "triton"
        monkeypatch.setenv("LADA_KERNEL", "triton")
        assert kernels.kernel_backend(x.cuda(), 10) == "triton"
    monkeypatch.delenv("LADA_KERNEL", raising=False)
    assert kernels.kernel_backend(x, 10**12) == "torch"  # the size never sends CPU tensors to Triton


class _FakeLM(nn.Module):
    def __init__(self, head, **config):
        super().__init__()
        self.head, self.config = head, SimpleNamespace(**config)

    def get_output_embeddings(self):
        return self.head


def test_head_is_plain_linear():
    assert kernels.head_is_plain_linear(_FakeLM(nn.Linear(8, 11, bias=False)))
    assert kernels.head_is_plain_linear(_FakeLM(nn.Linear(8, 11, bias=False), logits_scaling=1.0))
    assert not kernels.head_is_plain_linear(_FakeLM(nn.Linear(8, 11, bias=True)))
    assert not kernels.head_is_plain_linear(_FakeLM(nn.Sequential(nn.Linear(8, 11, bias=False))))
    assert not kernels.head_is_plain_linear(_FakeLM(nn.Linear(8, 11, bias=False), final_logit_softcapping=30.0))
    assert not kernels.head_is_plain_linear(_FakeLM(nn.Linear(8, 11, bias=False), logit_scale=0.0625))
    nested = _FakeLM(nn.Linear(8, 11, bias=False), text_config=SimpleNamespace(final_logit_softcapping=30.0))
    assert not kernels.head_is_plain_linear(nested)


def dard_v2_f64(hidden, weight, labels, ref, q, beta, alpha, w):
    """Independent float64 truth of the loss with per-pair contrast weights, written out term by term
    (no project function): L_b = w_b·(−[q log σ(h) + (1−q) log σ(−h)]) + α_b·(−lp⁺_b / n_b), batch mean.
    A w = 0 pair's y⁻ row is left out of h altogether."""
    B = q.shape[0]
    logps = logprob_f64(hidden, weight, labels)
    n = (labels[:B] != IGNORE).sum(1).double()
    total = 0
    for b in range(B):
        neg = (logps[B + b] - ref[B + b].double()) if w[b] else 0.0
        h = beta * ((logps[b] - ref[b].double()) - neg)
        contrast = -(q[b].double() * torch.log(torch.sigmoid(h)) + (1 - q[b].double()) * torch.log(torch.sigmoid(-h)))
        total = total + w[b] * contrast + alpha[b].double() * (-logps[b] / n[b])
    return total / B, logps


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda t: str(t).split(".")[-1])
@pytest.mark.parametrize("tok_from", ["kernel", "caller"])
def test_dard_loss_fused_mixed_contrast_weights_match_float64(tok_from, dtype, backend, device, monkeypatch):
    """Spec §4': w = 1 and w = 0 pairs and per-pair α in one batch, q = 1 − ε; the loss, the y⁺ log-probs
    and both gradients against float64, with grad_output ≠ 1. A w = 0 pair's y⁻ row is not computed
    (log-prob 0) and gets exactly no gradient, whether the kernel masks it (tok=None) or the caller
    masked its labels before finding tok (as distill does)."""
    use_backend(monkeypatch, backend, device)
    B, T, V, d, beta, eps = 4, 9, 131, 27, 0.1, 0.1
    hidden, weight, labels = make_inputs(2 * B, T, V, d, "prompt", dtype, device, seed=11)
    g = torch.Generator().manual_seed(12)
    ref = (logprob_f64(hidden, weight, labels) + 3 * torch.randn(2 * B, generator=g).to(device)).float().detach()
    q = torch.full((B,), 1 - eps, device=device)
    alpha = torch.tensor([1.0, 1.0, 0.5, 2.0], device=device)
    w = torch.tensor([1.0, 0.0, 1.0, 0.0], device=device)
    grad_out = 1.3
    kw = {}
    if tok_from == "caller":
        labels = kernels.mask_imitation_rows(labels, w, IGNORE)
        kw["tok"] = kernels.kept_tokens(labels, IGNORE)
    loss, logps = kernels.dard_loss_fused(hidden, weight, labels, ref, q, beta, alpha, ignore_index=IGNORE, w=w, **kw)
    (grad_out * loss).backward()

    expected, expected_logps = dard_v2_f64(hidden, weight, labels, ref, q, beta, alpha, w.tolist())
    dh, dw = grads_f64(lambda h, w_: grad_out * dard_v2_f64(h, w_, labels, ref, q, beta, alpha, w.tolist())[0],
                       hidden, weight)
    skipped = [B + 1, B + 3]  # the y⁻ rows of the w = 0 pairs
    assert logps[skipped].tolist() == [0.0, 0.0]
    kept = [r for r in range(2 * B) if r not in skipped]
    assert_close(logps[kept], expected_logps[kept], TOL[dtype][0])
    assert_close(loss, expected, (1e-5, 1e-5))
    assert_close(hidden.grad, dh, TOL[dtype][1])
    assert_close(weight.grad, dw, TOL[dtype][1])
    assert hidden.grad[skipped].abs().max().item() == 0.0
    assert hidden.grad[[B, B + 2]].abs().max().item() > 0  # the contrast pairs' y⁻ rows do get one


def test_dard_loss_w0_is_the_imitation_term_alone_by_hand():
    """A w = 0 pair: whatever its y⁻ log-prob, the loss is α·(−lp⁺/n) and only y⁺ has a gradient, −α/n.
    lp⁺ = −6 over n = 3 tokens, α = 1: loss 2.0, ∂/∂lp⁺ = −1/3."""
    for lp_neg in (-1.0, -50.0, 0.0):
        logps = torch.tensor([-6.0, lp_neg], dtype=torch.float64, requires_grad=True)
        ref = torch.tensor([-5.0, -4.0], dtype=torch.float64)
        loss = kernels.dard_loss_from_logps(logps, ref, torch.tensor([0.9], dtype=torch.float64), 0.1, 1.0,
                                            torch.tensor([3]), torch.tensor([0.0]))
        assert loss.item() == pytest.approx(2.0, rel=1e-12)
        loss.backward()
        assert logps.grad.tolist() == pytest.approx([-1 / 3, 0.0], rel=1e-12)
