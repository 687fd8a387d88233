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
# For pair b, lp = per-row summed log-probs, ref = π_ref's, n_b = unmasked tokens of y⁺_b:
#   h_b    = β · [(lp_b − ref_b) − (lp_{B+b} − ref_{B+b})]
#   L_b    = −[ q_b · log σ(h_b) + (1 − q_b) · log σ(−h_b) ]  +  α_b · (−lp_b / n_b)
#   loss   = (1/B) Σ_b L_b
# Gradient, using dL_DARD/dh = σ(h) − q:
#   ∂loss/∂lp_b     = (1/B) · [ β (σ(h_b) − q_b) − α_b / n_b ]
#   ∂loss/∂lp_{B+b} = (1/B) · [ −β (σ(h_b) − q_b) ]


def dard_loss_from_logps(logps, ref_logps, q, beta, alpha, n_tokens):
    """DARD loss of spec §4 (without λ·L_local) from per-sequence log-probs.

    logps (2B,) student's summed log-probs, rows [y⁺_0..y⁺_{B-1}, y⁻_0..y⁻_{B-1}]
    ref_logps (2B,) the round-start snapshot π_ref's, same layout
    q (B,) soft target in [0, 1]; beta float; alpha float or (B,) (α · correct(y⁺))
    n_tokens (B,) unmasked tokens of each y⁺ (clamped to >= 1 here)
    Returns the batch-mean loss (scalar), differentiable in logps.
    """
    B = q.shape[0]
    assert logps.shape == (2 * B,) and ref_logps.shape == (2 * B,), "logps/ref_logps must be (2B,)"
    ref = ref_logps.to(logps.dtype)
    q = q.to(logps.dtype)
    alpha = torch.as_tensor(alpha, dtype=logps.dtype, device=logps.device).expand(B)
    n = n_tokens.to(logps.dtype).clamp_min(1)
    h = beta * ((logps[:B] - ref[:B]) - (logps[B:] - ref[B:]))  # h_θ of spec §4
    l_dard = -(q * F.logsigmoid(h) + (1 - q) * F.logsigmoid(-h))  # L_DARD of spec §4
    return (l_dard + alpha * (-logps[:B] / n)).mean()  # + α · NLL_θ(y⁺|x)/|y⁺|


def _pair_counts(labels, ignore_index):
    """Unmasked tokens of each y⁺ row (first half of labels), (B,)."""
    return (labels[: labels.shape[0] // 2] != ignore_index).sum(1)


def dard_loss_reference(hidden, weight, labels, ref_logps, q, beta, alpha, ignore_index=-100, tok=None):
    """Same contract as `dard_loss_fused`, composed of seq_logprob_reference + dard_loss_from_logps."""
    assert hidden.shape[0] % 2 == 0, "hidden must stack B y⁺ rows then B y⁻ rows"
    logps = seq_logprob_reference(hidden, weight, labels, ignore_index, tok=tok)
    loss = dard_loss_from_logps(logps, ref_logps, q, beta, alpha, _pair_counts(labels, ignore_index))
    return loss, logps.detach()


# -----------------------------------------------------------------------------
# fused path


class _DardLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ref_logps, q, beta, alpha, ignore_index, tok):
        B = hidden.shape[0] // 2
        h2d, w, tok, row, lab = _flatten_valid(hidden, weight, labels, ignore_index, tok)
        tok_logp, lse = triton_token_fwd(h2d, w, tok, lab)  # fused forward, (n,) each
        logps = torch.zeros(2 * B, dtype=torch.float32, device=hidden.device).index_add_(0, row, tok_logp)
        n = _pair_counts(labels, ignore_index).float().clamp_min(1)
        ref, q = ref_logps.detach().float(), q.detach().float()
        alpha = torch.as_tensor(alpha, dtype=torch.float32, device=hidden.device).detach().expand(B)
        loss = dard_loss_from_logps(logps, ref, q, beta, alpha, n)

        # ∂loss/∂logps[row], see the comment above dard_loss_from_logps
        h = beta * ((logps[:B] - ref[:B]) - (logps[B:] - ref[B:]))
        g = (torch.sigmoid(h) - q) / B  # (1/B) dL_DARD/dh
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
        return gh, gw, None, None, None, None, None, None, None


def dard_loss_fused(hidden, weight, labels, ref_logps, q, beta, alpha, ignore_index=-100, tok=None):
    """DARD loss (spec §4, without λ·L_local) straight from the final hidden states.

    hidden (2B, T, d) student's final hidden states, rows [y⁺_0..y⁺_{B-1}, y⁻_0..y⁻_{B-1}]
    weight (V, d) student's lm_head weight; labels (2B, T) aligned with hidden, ignore_index masked
    ref_logps (2B,) π_ref's summed log-probs of the same rows; q (B,) soft targets
    beta float; alpha float or (B,) tensor (the caller passes α · correct(y⁺))
    tok (optional) kernels.kept_tokens(labels), computed where labels were built (no device sync here)
    Returns (loss scalar fp32, logps (2B,) fp32 detached). Gradients flow to hidden and weight only.
    """
    assert hidden.shape[0] % 2 == 0, "hidden must stack B y⁺ rows then B y⁻ rows"
    assert q.shape == (hidden.shape[0] // 2,), f"q {tuple(q.shape)}: expected ({hidden.shape[0] // 2},)"
    if kernel_backend(hidden, labels.numel() * weight.shape[0]) == "triton":
        return _DardLossFunction.apply(hidden, weight, labels, ref_logps, q, beta, alpha, ignore_index, tok)
    return dard_loss_reference(hidden, weight, labels, ref_logps, q, beta, alpha, ignore_index, tok)
