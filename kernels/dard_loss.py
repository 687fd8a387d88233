"""DARD loss (spec §4) fused with the sequence log-probs of its 2B paths (spec §5).

One call runs the fused forward of kernels/seq_logprob.py over the y⁺ and y⁻ rows, forms the loss
from the 2B summed log-probs, and keeps the per-row coefficient ∂loss/∂logps[row]. The backward
multiplies it by the upstream gradient, spreads it to the row's tokens and reuses the
seq_logprob backward kernel, so no (2B·T, V) logit or gradient tensor ever exists.

Layout (Liger's chosen/rejected convention): rows 0..B-1 of hidden/labels are the y⁺ paths, rows
B..2B-1 the y⁻ paths of the same B samples.
"""

import torch
import torch.nn.functional as F

from .seq_logprob import (_flatten_valid, kernel_backend, lean_backward, seq_logprob_reference, triton_token_bwd,
                          triton_token_bwd_lean, triton_token_fwd)

# -----------------------------------------------------------------------------
# the loss on sequence log-probs (any path computing logps can use it)
#
# For pair b, lp = per-row summed log-probs, ref = π_ref's, n_b = unmasked tokens of y⁺_b, and the
# pair's contrast weight w_b ∈ {0, 1} (spec §4': w = 0 is an imitation-only pair, its y⁻ row unused):
#   h_b    = β · [(lp_b − ref_b) − (lp_{B+b} − ref_{B+b})]
#   L_b    = −w_b · [ q_b · log σ(h_b) + (1 − q_b) · log σ(−h_b) ]  +  α_b · (−lp_b / n_b)
#   loss   = (1/B) Σ_b L_b
# Gradient, using dL_DARD/dh = σ(h) − q:
#   ∂loss/∂lp_b     = (1/B) · [ w_b β (σ(h_b) − q_b) − α_b / n_b ]
#   ∂loss/∂lp_{B+b} = (1/B) · [ −w_b β (σ(h_b) − q_b) ]
# v1 (spec §4) is w ≡ 1 with the teacher's soft q; v2 (spec §4') passes q = 1 − ε and w = [y⁻ wrong].


def _contrast_weight(w, B, like):
    """w as a (B,) tensor like `like` (None: every pair contrasts, w ≡ 1)."""
    if w is None:
        return torch.ones(B, dtype=like.dtype, device=like.device)
    return torch.as_tensor(w, device=like.device).to(like.dtype).expand(B)


def dard_loss_from_logps(logps, ref_logps, q, beta, alpha, n_tokens, w=None):
    """DARD loss of spec §4 / §4' (without λ·L_local) from per-sequence log-probs.

    logps (2B,) student's summed log-probs, rows [y⁺_0..y⁺_{B-1}, y⁻_0..y⁻_{B-1}]
    ref_logps (2B,) the round-start snapshot π_ref's, same layout
    q (B,) target in [0, 1]; beta float; alpha float or (B,) (α · correct(y⁺))
    n_tokens (B,) unmasked tokens of each y⁺ (clamped to >= 1 here)
    w (B,) contrast weight in {0, 1}, or None for all ones; a w = 0 pair's y⁻ log-prob is not read
    (it may be anything finite, e.g. 0 when its row was masked out)
    Returns the batch-mean loss (scalar), differentiable in logps.
    """
    B = q.shape[0]
    assert logps.shape == (2 * B,) and ref_logps.shape == (2 * B,), "logps/ref_logps must be (2B,)"
    ref = ref_logps.to(logps.dtype)
    q = q.to(logps.dtype)
    alpha = torch.as_tensor(alpha, dtype=logps.dtype, device=logps.device).expand(B)
    w = _contrast_weight(w, B, logps)
    n = n_tokens.to(logps.dtype).clamp_min(1)
    neg = torch.where(w > 0, logps[B:] - ref[B:], torch.zeros_like(logps[B:]))  # a w = 0 row: never read
    h = beta * ((logps[:B] - ref[:B]) - neg)  # h_θ of spec §4
    l_dard = -(q * F.logsigmoid(h) + (1 - q) * F.logsigmoid(-h))  # L_DARD of spec §4 (§4': q = 1 − ε)
    return (w * l_dard + alpha * (-logps[:B] / n)).mean()  # + α · NLL_θ(y⁺|x)/|y⁺|


def _pair_counts(labels, ignore_index):
    """Unmasked tokens of each y⁺ row (first half of labels), (B,)."""
    return (labels[: labels.shape[0] // 2] != ignore_index).sum(1)


def mask_imitation_rows(labels, w, ignore_index=-100):
    """labels with the y⁻ rows of w = 0 pairs masked out (no device sync): what the head then skips."""
    if w is None:
        return labels
    B = labels.shape[0] // 2
    drop = (torch.as_tensor(w, device=labels.device).expand(B) == 0)[:, None]  # (B, 1)
    return torch.cat([labels[:B], torch.where(drop, torch.full_like(labels[B:], ignore_index), labels[B:])])


def dard_loss_reference(hidden, weight, labels, ref_logps, q, beta, alpha, ignore_index=-100, tok=None, w=None):
    """Same contract as `dard_loss_fused`, composed of seq_logprob_reference + dard_loss_from_logps."""
    assert hidden.shape[0] % 2 == 0, "hidden must stack B y⁺ rows then B y⁻ rows"
    if w is not None and tok is None:
        labels = mask_imitation_rows(labels, w, ignore_index)
    logps = seq_logprob_reference(hidden, weight, labels, ignore_index, tok=tok)
    loss = dard_loss_from_logps(logps, ref_logps, q, beta, alpha, _pair_counts(labels, ignore_index), w)
    return loss, logps.detach()


# -----------------------------------------------------------------------------
# fused path


class _DardLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ref_logps, q, beta, alpha, ignore_index, tok, w_pair):
        B = hidden.shape[0] // 2
        h2d, w, tok, row, lab = _flatten_valid(hidden, weight, labels, ignore_index, tok)
        tok_logp, lse = triton_token_fwd(h2d, w, tok, lab)  # fused forward, (n,) each
        logps = torch.zeros(2 * B, dtype=torch.float32, device=hidden.device).index_add_(0, row, tok_logp)
        n = _pair_counts(labels, ignore_index).float().clamp_min(1)
        ref, q = ref_logps.detach().float(), q.detach().float()
        alpha = torch.as_tensor(alpha, dtype=torch.float32, device=hidden.device).detach().expand(B)
        w_pair = _contrast_weight(w_pair, B, logps).detach()
        loss = dard_loss_from_logps(logps, ref, q, beta, alpha, n, w_pair)

        # ∂loss/∂logps[row], see the comment above dard_loss_from_logps
        neg = torch.where(w_pair > 0, logps[B:] - ref[B:], torch.zeros_like(logps[B:]))
        h = beta * ((logps[:B] - ref[:B]) - neg)
        g = w_pair * (torch.sigmoid(h) - q) / B  # (1/B) w dL_DARD/dh
        coef_row = torch.cat([beta * g - alpha / (n * B), -beta * g])  # (2B,)

        ctx.save_for_backward(h2d, w, tok, row, lab, lse, coef_row)
        ctx.hidden_shape, ctx.weight_dtype, ctx.lean = hidden.shape, weight.dtype, lean_backward()
        ctx.mark_non_differentiable(logps)
        return loss, logps

    @staticmethod
    def backward(ctx, grad_loss, _grad_logps):  # logps is detached: its gradient is ignored
        h2d, w, tok, row, lab, lse, coef_row = ctx.saved_tensors
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        coef = (coef_row * grad_loss.float())[row]  # per token: ∂loss/∂logps[row(i)] · grad_output
        gh, gw = (triton_token_bwd_lean if ctx.lean else triton_token_bwd)(h2d, w, tok, lab, lse, coef, need_dh, need_dw)
        gh = gh.view(ctx.hidden_shape) if need_dh else None
        gw = gw.to(ctx.weight_dtype) if need_dw else None
        return gh, gw, None, None, None, None, None, None, None, None


def dard_loss_fused(hidden, weight, labels, ref_logps, q, beta, alpha, ignore_index=-100, tok=None, w=None):
    """DARD loss (spec §4 / §4', without λ·L_local) straight from the final hidden states.

    hidden (2B, T, d) student's final hidden states, rows [y⁺_0..y⁺_{B-1}, y⁻_0..y⁻_{B-1}]
    weight (V, d) student's lm_head weight; labels (2B, T) aligned with hidden, ignore_index masked
    ref_logps (2B,) π_ref's summed log-probs of the same rows; q (B,) targets
    beta float; alpha float or (B,) tensor (the caller passes α · correct(y⁺))
    tok (optional) kernels.kept_tokens(labels), computed where labels were built (no device sync here)
    w (optional) (B,) contrast weight in {0, 1} (spec §4'): a w = 0 pair is imitation only, its y⁻ row
    contributes nothing and is not computed: without `tok` its labels are masked here
    (`mask_imitation_rows`); a caller passing `tok` masks them before finding it, as distill does
    Returns (loss scalar fp32, logps (2B,) fp32 detached; 0 for a skipped y⁻ row). Gradients flow to
    hidden and weight only.
    """
    assert hidden.shape[0] % 2 == 0, "hidden must stack B y⁺ rows then B y⁻ rows"
    assert q.shape == (hidden.shape[0] // 2,), f"q {tuple(q.shape)}: expected ({hidden.shape[0] // 2},)"
    if w is not None and tok is None:
        labels = mask_imitation_rows(labels, w, ignore_index)
    if kernel_backend(hidden, labels.numel() * weight.shape[0]) == "triton":
        return _DardLossFunction.apply(hidden, weight, labels, ref_logps, q, beta, alpha, ignore_index, tok, w)
    return dard_loss_reference(hidden, weight, labels, ref_logps, q, beta, alpha, ignore_index, tok, w)
