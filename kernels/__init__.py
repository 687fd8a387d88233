"""Fused LM-head kernels for LaDa (spec §5).

    seq_logprob(hidden, weight, labels)            -> (B,) summed log-probs of each row's labels
    dard_loss_fused(hidden, weight, labels, ...)   -> (DARD loss, detached (2B,) log-probs); w: per-pair contrast

Both run Triton kernels on CUDA tensors whose batch would hold more than SMALL_HEAD_LOGITS logits,
and their plain-torch references (same files) elsewhere; `LADA_KERNEL=triton|torch` forces a path,
`kernel_backend(t, n_logits)` says which one runs. `tok=kept_tokens(labels)`, computed where the
labels are built, spares the device sync of finding the unmasked tokens. `LADA_KERNEL_BACKWARD=lean`
selects a backward with a quarter of the extra memory or less, for one more pass over the logits
(kernels/BENCH.md).
Callers check `head_is_plain_linear(model)` first: the kernels compute hidden @ weightᵀ and nothing
more, so a head with a bias, logit soft-capping or logit scaling needs the model's own forward.
"""

from torch import nn

from .dard_loss import dard_loss_from_logps, dard_loss_fused, dard_loss_reference, mask_imitation_rows
from .seq_logprob import HAS_TRITON, SMALL_HEAD_LOGITS, kept_tokens, kernel_backend, seq_logprob, seq_logprob_reference

__all__ = [
    "seq_logprob", "seq_logprob_reference", "dard_loss_fused", "dard_loss_reference",
    "dard_loss_from_logps", "mask_imitation_rows", "kernel_backend", "kept_tokens", "head_is_plain_linear", "HAS_TRITON", "SMALL_HEAD_LOGITS",
]

# config fields (transformers names) that change logits after lm_head, and their "off" values
_SOFTCAP_FIELDS = ("final_logit_softcapping", "logit_softcapping")  # Gemma 2/3 (None = off)
# Cohere, Granite, Grok, Falcon-H1 (1 = off)
_SCALE_FIELDS = ("logit_scale", "logits_scaling", "output_multiplier_scale", "lm_head_multiplier")


def _configs(model):
    cfg = getattr(model, "config", None)
    if cfg is None:
        return []
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else getattr(cfg, "text_config", None)
    return [c for c in (cfg, text) if c is not None]


def head_is_plain_linear(model):
    """True when model's logits are exactly final_hidden @ lm_head.weightᵀ (what the kernels compute).

    False for a head that is not an nn.Linear, has a bias, or whose config soft-caps or scales the
    logits (e.g. Gemma-2 `final_logit_softcapping`, Cohere `logit_scale`, Granite `logits_scaling`).
    Callers fall back to the model's own forward with a one-line warnings.warn.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is not nn.Linear or head.bias is not None:
        return False
    for cfg in _configs(model):
        if any(getattr(cfg, f, None) not in (None, 0, 0.0) for f in _SOFTCAP_FIELDS):
            return False
        if any(getattr(cfg, f, None) not in (None, 1, 1.0) for f in _SCALE_FIELDS):
            return False
    return True
