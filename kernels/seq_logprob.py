"""Fused per-sequence log-probability of labels under a linear LM head (spec §5).

Motivation: DARD (spec §4) needs log p(y|x) summed over a path's tokens. The plain way, logits =
hidden @ weightᵀ, materializes a (B·T, V) tensor: 8192 tokens × 152k vocabulary is 2.5 GB in bf16
and twice that in fp32 for log_softmax, more than the rest of a small model's activations. These
kernels never hold it: the forward streams vocabulary blocks through an online log-sum-exp; the
backward walks the vocabulary in chunks, recomputing each chunk's logits in a Triton kernel that
writes only its (tokens, chunk) d_logits, and hands the two gradient products to cuBLAS.
Timings on an H100 against eager torch, torch.compile, Liger and Cut Cross-Entropy: kernels/BENCH.md.

File layout (Triton-tutorial order): plain-torch reference -> kernels -> host wrappers ->
autograd Function -> dispatch. Tests: tests/test_kernels.py; benchmark: kernels/bench.py.

Dispatch (`kernel_backend`): CUDA tensors run Triton, CPU tensors run the torch reference.
`LADA_KERNEL=triton|torch` forces a path; Triton on CPU tensors needs `TRITON_INTERPRET=1` set
before `import kernels` (the interpreter is chosen when the kernels are decorated). With
TRITON_INTERPRET=1 but LADA_KERNEL unset, CPU tensors still run the torch reference: the
interpreter is ~1000x slower and the tests set TRITON_INTERPRET=1 for the whole session, so
picking it implicitly would make every model test crawl.
"""

import functools
import os

import torch
from torch.utils.checkpoint import checkpoint

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # CPU-only installs: this module still imports, the torch reference runs

    class _NoTriton:
        constexpr = None
        jit = staticmethod(lambda fn=None, **kw: fn)
        cdiv = staticmethod(lambda a, b: -(-a // b))

    triton = tl = _NoTriton()
    HAS_TRITON = False

# -----------------------------------------------------------------------------
# plain-torch reference (also the CPU path)


def _token_logprob(h, w, lab):
    """log_softmax(h @ wᵀ)[lab] for n tokens; h (n, d), w (V, d), lab (n,) -> (n,). Written as
    −cross_entropy, whose fused log-softmax forward and backward run ~1.3x faster on a CPU than
    logsumexp and gather (the CPU path of every training step)."""
    logits = h.to(w.dtype) @ w.T  # (n, V), fp32 (fp64 for fp64 inputs)
    return -torch.nn.functional.cross_entropy(logits, lab, reduction="none")


def kept_tokens(labels, ignore_index=-100):
    """Flat indices b*T + t of the unmasked tokens of labels (B, T), int64, sorted. On a GPU this is a
    host sync (`nonzero`); callers that build labels on the host compute it there and pass it as `tok`
    (distill.collate does), so that a training step never waits for the device."""
    return (labels != ignore_index).reshape(-1).nonzero().squeeze(1)


def _kept(labels, ignore_index, tok):
    """The caller's `tok` on labels' device, or `kept_tokens` found here: what both paths index by."""
    return kept_tokens(labels, ignore_index) if tok is None else tok.to(labels.device)


def seq_logprob_reference(hidden, weight, labels, ignore_index=-100, chunk_tokens=None, tok=None):
    """Same contract as `seq_logprob`, in plain torch.

    hidden (B, T, d), weight (V, d), labels (B, T) already aligned with hidden. Returns (B,) in
    fp32 (fp64 for fp64 inputs). Only unmasked tokens are computed, `chunk_tokens` at a time
    (default: 2^26 logits per chunk, 256 MB in fp32); with several chunks each runs under
    activation checkpointing, so the peak stays one (chunk_tokens, V) block, not (tokens, V).
    """
    B, T, d = hidden.shape
    ctype = torch.promote_types(hidden.dtype, torch.float32)
    chunk_tokens = chunk_tokens or max(1, 2**26 // weight.shape[0])
    tok = _kept(labels, ignore_index, tok)  # flat b*T + t of kept tokens
    h = hidden.reshape(-1, d)[tok]  # (n, d)
    lab = labels.reshape(-1)[tok]
    w = weight.to(ctype)  # one upcast copy, shared by the chunks
    ckpt = torch.is_grad_enabled() and (h.requires_grad or w.requires_grad) and len(tok) > chunk_tokens
    pieces = []
    for i in range(0, max(len(tok), 1), chunk_tokens):  # one (maybe empty) chunk keeps the graph
        args = (h[i : i + chunk_tokens], w, lab[i : i + chunk_tokens])
        pieces.append(checkpoint(_token_logprob, *args, use_reentrant=False) if ckpt else _token_logprob(*args))
    out = torch.zeros(B, dtype=ctype, device=hidden.device)
    return out.index_add(0, tok // T, torch.cat(pieces))


# -----------------------------------------------------------------------------
# Triton kernels
#
# Notation: token i with hidden row h_i, target y_i; z_iv = h_i · w_v; lse_i = log Σ_v exp z_iv.
#   forward:  logp_i = z_{i,y_i} - lse_i            out[b] = Σ_{i in row b, unmasked} logp_i
#   backward: with c_i = ∂L/∂logp_i (= grad_output[b] of the token's row, 0 for masked tokens)
#             ∂L/∂z_iv = c_i · (1[v = y_i] - exp(z_iv - lse_i))   ("d_logits", one vocabulary chunk at a time)
#             ∂L/∂h_i  = Σ_v ∂L/∂z_iv · w_v        ∂L/∂w_v = Σ_i ∂L/∂z_iv · h_i
# Only unmasked tokens are launched: the host passes TOK, their flat row indices into hidden.
# All pointer offsets (token * d, vocab * d) are int64: 8192 tokens × 152k vocabulary > 2^31.


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, DOT_FP32: tl.constexpr):
    """acc + a @ b. DOT_FP32 upcasts bf16 operands first (exact: bf16 products fit in fp32); the
    host sets it only under TRITON_INTERPRET, whose tl.dot (3.9) multiplies bf16 as raw bits."""
    if DOT_FP32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _logit_block(
    H, W,  # hidden (N, d) and weight (V, d), unit stride along d
    rows, t_mask,  # int64 (BLOCK_T,) hidden rows of this token block, and which are real
    cols, v_mask,  # int64 (BLOCK_V,) vocabulary ids of this block, and which are < V
    D, stride_h, stride_w,  # hidden size; row strides of H and W in elements
    BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
):
    """z[BLOCK_T, BLOCK_V] = h[rows] @ w[cols]ᵀ in fp32, looping over d in BLOCK_D tiles."""
    acc = tl.zeros((BLOCK_T, BLOCK_V), dtype=tl.float32)
    for k in range(0, D, BLOCK_D):
        offs_d = k + tl.arange(0, BLOCK_D)
        d_mask = offs_d < D  # d need not be a multiple of BLOCK_D (nor a power of two)
        h_mask, w_mask = t_mask[:, None] & d_mask[None, :], v_mask[:, None] & d_mask[None, :]
        h = tl.load(H + rows[:, None] * stride_h + offs_d[None, :], mask=h_mask, other=0.0)  # (BLOCK_T, BLOCK_D)
        w = tl.load(W + cols[:, None] * stride_w + offs_d[None, :], mask=w_mask, other=0.0)  # (BLOCK_V, BLOCK_D)
        acc = _dot(h, tl.trans(w), acc, PRECISION, DOT_FP32)
    return acc


@triton.jit
def _seq_logprob_fwd(
    H, W,  # hidden (N, d), weight (V, d)
    TOK,  # int64 (n,) flat index b*T + t of each unmasked token (its row of H)
    LAB,  # int64 (n,) its target id
    LSE_PART,  # fp32 (S, n) out: log-sum-exp of the token's logits over split s's vocabulary range
    TGT_PART,  # fp32 (S, n) out: the target logit if the target lies in split s, else 0
    n_tok, V, D,  # unmasked tokens, vocabulary size, hidden size
    stride_h, stride_w,  # row strides of H and W
    v_per_split,  # vocabulary entries per split, a multiple of BLOCK_V
    BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
):
    # grid = (token blocks, vocabulary splits); the host combines the S partial lse with logsumexp
    pid_t = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1).to(tl.int64)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = offs_t < n_tok
    rows = tl.load(TOK + offs_t, mask=t_mask, other=0)  # int64
    lab = tl.load(LAB + offs_t, mask=t_mask, other=-1)

    m = tl.full((BLOCK_T,), float("-inf"), dtype=tl.float32)  # running max of z
    s = tl.zeros((BLOCK_T,), dtype=tl.float32)  # running Σ exp(z - m)
    tgt = tl.zeros((BLOCK_T,), dtype=tl.float32)
    v_start = pid_s * v_per_split
    v_end = tl.minimum(v_start + v_per_split, V)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        v_mask = cols < V
        z = _logit_block(H, W, rows, t_mask, cols, v_mask, D, stride_h, stride_w,
                         BLOCK_T, BLOCK_V, BLOCK_D, PRECISION, DOT_FP32)
        z = tl.where(v_mask[None, :], z, float("-inf"))
        tgt += tl.sum(tl.where(cols[None, :] == lab[:, None], z, 0.0), axis=1)
        m_new = tl.maximum(m, tl.max(z, axis=1))  # online log-sum-exp
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m = m_new
    out = pid_s * n_tok + offs_t
    tl.store(LSE_PART + out, m + tl.log(s), mask=t_mask)
    tl.store(TGT_PART + out, tgt, mask=t_mask)


@triton.jit
def _dlogits_kernel(
    H, W,  # hidden (N, d), weight (V, d)
    TOK, LAB,  # int64 (n,) unmasked tokens' rows of H and targets, as in the forward
    LSE,  # fp32 (n,) log-sum-exp saved by the forward
    COEF,  # fp32 (n,) c_i = ∂L/∂logp_i
    DZ,  # (n, >= n_cols) out, hidden's dtype: d_logits of this vocabulary chunk
    n_tok, D, v0, n_cols,  # the chunk is vocabulary ids v0 .. v0 + n_cols - 1 (all < V)
    stride_h, stride_w, stride_dz,
    BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
):
    # grid = (token blocks, vocabulary blocks of the chunk): recompute one logit tile in fp32,
    # turn it into d_logits with the saved lse, store it once in 16 bits; cuBLAS does the rest
    pid_t = tl.program_id(0).to(tl.int64)
    pid_v = tl.program_id(1).to(tl.int64)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = offs_t < n_tok
    rows = tl.load(TOK + offs_t, mask=t_mask, other=0)
    lab = tl.load(LAB + offs_t, mask=t_mask, other=-1)
    lse = tl.load(LSE + offs_t, mask=t_mask, other=0.0)
    coef = tl.load(COEF + offs_t, mask=t_mask, other=0.0)
    offs_c = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)  # column within the chunk
    cols = v0 + offs_c
    v_mask = offs_c < n_cols

    z = _logit_block(H, W, rows, t_mask, cols, v_mask, D, stride_h, stride_w,
                     BLOCK_T, BLOCK_V, BLOCK_D, PRECISION, DOT_FP32)
    p = tl.exp(z - lse[:, None])  # softmax, recomputed
    onehot = tl.where(cols[None, :] == lab[:, None], 1.0, 0.0)
    dz = coef[:, None] * (onehot - p)
    tl.store(DZ + offs_t[:, None] * stride_dz + offs_c[None, :], dz.to(DZ.dtype.element_ty),
             mask=t_mask[:, None] & v_mask[None, :])


# -----------------------------------------------------------------------------
# host wrappers: check shapes, pick blocks, allocate, launch

_INTERPRETED = HAS_TRITON and type(_seq_logprob_fwd).__name__ == "InterpretedFunction"
# The interpreter runs each block op as one numpy call, so fewer, larger blocks are faster; these
# are still small enough that the tests' odd shapes (V=173, d=37) span several blocks, and
# num_splits=2 exercises the split-vocabulary path.
INTERPRET_CONFIG = dict(BLOCK_T=16, BLOCK_V=64, BLOCK_D=16, num_splits=2, num_warps=1, num_stages=1)


# On CUDA, by dtype. 16-bit: timed on an H100 (kernels/BENCH.md: 128x128, 128x256, 256x128, 64x256
# tiles swept; 128 x 256: forward 26.5 -> 19.9 ms at 8192 x 152k x 3584). fp32: smaller tiles and 8
# warps avoid register spills (read off the sm_90 cubin); not timed. num_splits None: from the SM count.
CUDA_CONFIGS = {
    "fp32": dict(BLOCK_T=64, BLOCK_V=64, BLOCK_D=32, num_splits=None, num_warps=8, num_stages=2),
    "16-bit": dict(BLOCK_T=128, BLOCK_V=256, BLOCK_D=64, num_splits=None, num_warps=8, num_stages=3),
}


def _base_config(h2d) -> dict:
    """The block sizes, warps, stages and vocabulary splits for h2d's device and dtype."""
    if not h2d.is_cuda:
        return dict(INTERPRET_CONFIG)
    return dict(CUDA_CONFIGS["fp32" if h2d.dtype == torch.float32 else "16-bit"])


def _sm_count(device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _launch_config(h2d):
    """Kernel meta-parameters for this device and dtype, and the forward's vocabulary splits
    (None = choose from the SM count). Static, not autotuned."""
    cfg = _base_config(h2d)
    # tl.dot precision: fp32 follows torch's matmul switch (default off: exact fp32 products);
    # the setting does not matter for 16-bit operands, which keep Triton's default
    tf32 = h2d.dtype != torch.float32 or (h2d.is_cuda and torch.backends.cuda.matmul.allow_tf32)
    cfg.update(PRECISION="tf32" if tf32 else "ieee", DOT_FP32=_INTERPRETED and h2d.dtype == torch.bfloat16)
    return cfg, cfg.pop("num_splits")


def _flatten_valid(hidden, weight, labels, ignore_index, tok=None):
    """Kernel inputs: h2d (B*T, d) and w (V, d) in hidden's dtype with unit stride along d, and the
    unmasked tokens' flat indices tok (`kept_tokens`, unless the caller gives them), rows b = tok // T
    and targets lab, all int64 (n,)."""
    B, T, d = hidden.shape
    assert weight.dim() == 2 and weight.shape[1] == d, f"weight {tuple(weight.shape)} vs hidden d={d}"
    assert labels.shape == (B, T), f"labels {tuple(labels.shape)} vs hidden {(B, T)}"
    assert hidden.device == weight.device == labels.device
    h2d = hidden.reshape(B * T, d)
    h2d = h2d if h2d.stride(1) == 1 else h2d.contiguous()
    w = weight.to(hidden.dtype)  # e.g. fp32 master weights with bf16 activations, as autocast does
    w = w if w.stride(1) == 1 else w.contiguous()
    tok = _kept(labels, ignore_index, tok)
    lab = labels.reshape(-1)[tok].long().contiguous()
    return h2d, w, tok, tok // T, lab


def triton_token_fwd(h2d, weight, tok, lab):
    """Per-token log-probs and log-sum-exps of the tokens `tok` of h2d: two fp32 (n,) tensors."""
    n, (V, D) = tok.numel(), weight.shape
    if n == 0:
        empty = torch.zeros(0, dtype=torch.float32, device=h2d.device)
        return empty, empty.clone()
    cfg, splits = _launch_config(h2d)
    BT, BV = cfg["BLOCK_T"], cfg["BLOCK_V"]
    n_tblocks, n_vblocks = triton.cdiv(n, BT), triton.cdiv(V, BV)
    if splits is None:  # split the vocabulary until there are ~2 programs per SM
        splits = triton.cdiv(2 * _sm_count(h2d.device), n_tblocks)
    splits = max(1, min(splits, n_vblocks))
    v_per_split = triton.cdiv(n_vblocks, splits) * BV
    splits = triton.cdiv(V, v_per_split)  # no empty split
    lse_part = torch.empty(splits, n, dtype=torch.float32, device=h2d.device)
    tgt_part = torch.empty_like(lse_part)
    _seq_logprob_fwd[(n_tblocks, splits)](
        h2d, weight, tok, lab, lse_part, tgt_part, n, V, D, h2d.stride(0), weight.stride(0), v_per_split, **cfg
    )
    lse = torch.logsumexp(lse_part, dim=0) if splits > 1 else lse_part[0]
    return tgt_part.sum(0) - lse, lse


@functools.cache
def _has_fp32_out_mm(device_type):
    """Whether torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc) runs for 16-bit a, b on this
    device type (recent CUDA builds) *and adds into acc*: probed once on small tensors against an
    fp32 product, so that a build which runs the call but drops or mis-rounds acc falls back."""
    try:
        g = torch.Generator().manual_seed(0)
        a, b = (torch.randn(s, generator=g).bfloat16() for s in ((48, 40), (40, 24)))
        acc = torch.randn(48, 24, generator=g)
        want = acc + a.float() @ b.float()
        got = acc.to(device_type)
        torch.addmm(got, a.to(device_type), b.to(device_type), out_dtype=torch.float32, out=got)
        return bool(torch.allclose(got.cpu(), want, rtol=1e-3, atol=1e-3))
    except (TypeError, RuntimeError, NotImplementedError):
        return False


def _add_product(acc, a, b):
    """acc += a @ b for an fp32 acc. 16-bit a, b: one cuBLAS call that accumulates into acc in fp32
    where torch has addmm(out_dtype=), else a 16-bit product added in fp32."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif _has_fp32_out_mm(a.device.type):
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:
        acc += a @ b


DZ_FRACTION = 16  # the backward's (n, C) d_logits buffer holds at most V·d / 16 entries (1/16 of grad_weight)


def triton_token_bwd(h2d, weight, tok, lab, lse, coef, need_dh=True, need_dw=True, chunk_cols=None,
                     dz_fraction=DZ_FRACTION, gh=None):
    """Gradients (N, d) and (V, d) in h2d's dtype for per-token upstream gradients coef (n,); None
    where not needed. The vocabulary is walked in chunks of C columns (default: the largest multiple
    of BLOCK_V with n·C ≤ V·d / DZ_FRACTION): a Triton kernel recomputes the chunk's logits in fp32
    and writes its d_logits once in 16 bits; cuBLAS writes grad_weight[chunk] = d_logitsᵀ @ h (one
    product over all tokens, rounded once) and adds d_logits @ weight[chunk] into an fp32 (n, d)
    grad_hidden accumulator. Extra memory: the buffer and the accumulator (and, without
    addmm(out_dtype=), one 16-bit (n, d) product). `gh` given: the tokens' rows are written into it
    (the lean backward's slices), the other rows left as they are."""
    N, (V, D), n = h2d.shape[0], weight.shape, tok.numel()
    gw = None
    if need_dh and gh is None:  # zeros only for the rows no chunk writes: masked tokens'
        gh = (torch.empty if n == N else torch.zeros)(h2d.shape, dtype=h2d.dtype, device=h2d.device)
    if need_dw:  # every row is written once a token counts
        gw = (torch.empty if n > 0 else torch.zeros)(weight.shape, dtype=weight.dtype, device=h2d.device)
    if n == 0 or not (need_dh or need_dw):
        return gh, gw
    cfg, _ = _launch_config(h2d)
    BT, BV = cfg["BLOCK_T"], cfg["BLOCK_V"]
    h = h2d if n == N else h2d[tok]  # (n, d) the unmasked tokens (tok is sorted and unique)
    cols = chunk_cols or V * D // (dz_fraction * n)
    cols = min(max(BV, cols // BV * BV), triton.cdiv(V, BV) * BV)
    dz = torch.empty(n, cols, dtype=h2d.dtype, device=h2d.device)
    gh_acc = torch.zeros(n, D, dtype=torch.float32, device=h2d.device) if need_dh else None
    coef = coef.float().contiguous()
    for v0 in range(0, V, cols):
        c = min(cols, V - v0)
        _dlogits_kernel[(triton.cdiv(n, BT), triton.cdiv(c, BV))](
            h2d, weight, tok, lab, lse, coef, dz, n, D, v0, c, h2d.stride(0), weight.stride(0), dz.stride(0), **cfg
        )
        d = dz[:, :c]
        if need_dw:
            torch.mm(d.T, h, out=gw[v0 : v0 + c])
        if need_dh:
            _add_product(gh_acc, d, weight[v0 : v0 + c])
    if need_dh and n == N:
        gh.copy_(gh_acc)  # converts in place: no (n, d) temporary
    elif need_dh:
        gh.index_copy_(0, tok, gh_acc.to(gh.dtype))
    return gh, gw


LEAN_SLICES = 8  # the lean backward computes grad_hidden for n / LEAN_SLICES tokens at a time
LEAN_DZ_FRACTION = 64  # and holds a d_logits buffer of V·d / 64 entries


def triton_token_bwd_lean(h2d, weight, tok, lab, lse, coef, need_dh=True, need_dw=True):
    """`triton_token_bwd` in a quarter of its extra memory or less, for one more pass over the logits:
    grad_weight in one sweep over vocabulary chunks (it needs no accumulator), then grad_hidden one
    slice of n / LEAN_SLICES tokens at a time, each with its own sweep, so the fp32 accumulator holds
    a slice's rows and never all n. The d_logits buffer is V·d / LEAN_DZ_FRACTION. Work: 10·N·V·d for
    forward and backward, against the fast backward's 8 (the logits are recomputed once more for
    grad_hidden). Every product still accumulates in fp32 and is rounded once: same error.
    Selected by LADA_KERNEL_BACKWARD=lean (`lean_backward`)."""
    n = tok.numel()
    gh = gw = None
    if need_dw:
        _, gw = triton_token_bwd(h2d, weight, tok, lab, lse, coef, need_dh=False, need_dw=True,
                                 dz_fraction=LEAN_DZ_FRACTION)
    if need_dh:
        gh = torch.zeros(h2d.shape, dtype=h2d.dtype, device=h2d.device)  # masked tokens' rows stay 0
        step = max(1, -(-n // LEAN_SLICES))
        for i in range(0, n, step):
            s = slice(i, i + step)
            triton_token_bwd(h2d, weight, tok[s], lab[s], lse[s], coef[s], need_dh=True, need_dw=False,
                             dz_fraction=LEAN_DZ_FRACTION, gh=gh)
    return gh, gw


def lean_backward() -> bool:
    """Whether LADA_KERNEL_BACKWARD selects the lean backward ('lean') over the fast one ('fast', default)."""
    mode = os.environ.get("LADA_KERNEL_BACKWARD", "fast").strip().lower()
    if mode not in ("fast", "lean"):
        raise ValueError(f"LADA_KERNEL_BACKWARD={mode!r}: expected 'fast' or 'lean'")
    return mode == "lean"


class _SeqLogprobFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, tok):
        h2d, w, tok, row, lab = _flatten_valid(hidden, weight, labels, ignore_index, tok)
        tok_logp, lse = triton_token_fwd(h2d, w, tok, lab)
        out = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        out.index_add_(0, row, tok_logp)  # per-row sum of the (n,) per-token log-probs
        ctx.save_for_backward(h2d, w, tok, row, lab, lse)
        ctx.hidden_shape, ctx.weight_dtype, ctx.lean = hidden.shape, weight.dtype, lean_backward()
        return out

    @staticmethod
    def backward(ctx, grad_out):
        h2d, w, tok, row, lab, lse = ctx.saved_tensors
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        coef = grad_out.float()[row]  # c_i = grad_output[b(i)]
        gh, gw = (triton_token_bwd_lean if ctx.lean else triton_token_bwd)(h2d, w, tok, lab, lse, coef, need_dh, need_dw)
        gh = gh.view(ctx.hidden_shape) if need_dh else None
        gw = gw.to(ctx.weight_dtype) if need_dw else None
        return gh, gw, None, None, None


# -----------------------------------------------------------------------------
# dispatch


_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Below this many logits (batch rows x length x vocabulary: 64 MB in fp32) the torch head runs on a GPU
# too: its logits are small, and cuBLAS + cross_entropy beat the fused kernels' launches there (H200,
# the default preset's 78-entry character SLM: 23.4 against 35.6 ms a warm-up step; docs/gpu.md).
SMALL_HEAD_LOGITS = 2**24


def kernel_backend(tensor, n_logits=None):
    """'triton' or 'torch': the path `seq_logprob` / `dard_loss_fused` take for this tensor, whose
    batch would hold n_logits logits (None: large). LADA_KERNEL=triton|torch forces a path."""
    forced = os.environ.get("LADA_KERNEL", "").strip().lower()
    if forced not in ("", "triton", "torch"):
        raise ValueError(f"LADA_KERNEL={forced!r}: expected 'triton' or 'torch'")
    if forced == "torch" or not HAS_TRITON or tensor.dtype not in _KERNEL_DTYPES:
        return "torch"  # (float64 inputs, e.g. for checking, always take the reference)
    if tensor.is_cuda:
        return "torch" if forced == "" and n_logits is not None and n_logits <= SMALL_HEAD_LOGITS else "triton"
    if forced == "triton":
        if _INTERPRETED:
            return "triton"
        raise RuntimeError("LADA_KERNEL=triton on CPU tensors needs TRITON_INTERPRET=1 set before `import kernels`")
    return "torch"


def seq_logprob(hidden, weight, labels, ignore_index=-100, tok=None):
    """Σ_t log softmax(hidden[b,t] @ weightᵀ)[labels[b,t]] over unmasked t, per row b.

    hidden (B, T, d) final hidden states (input of lm_head); weight (V, d) lm_head weight;
    labels (B, T) int in [0, V) or ignore_index (masked), aligned with hidden (the caller shifts);
    tok (optional) `kept_tokens(labels)` computed where labels were built (no device sync here).
    Returns (B,) fp32, differentiable in hidden and weight; a fully masked row gives exactly 0.
    """
    if kernel_backend(hidden, labels.numel() * weight.shape[0]) == "triton":
        return _SeqLogprobFunction.apply(hidden, weight, labels, ignore_index, tok)
    return seq_logprob_reference(hidden, weight, labels, ignore_index, tok=tok)
