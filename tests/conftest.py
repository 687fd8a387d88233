"""Shared pytest setup. Runs before any test module imports the project."""

import os
import sys

# Without a GPU, run Triton kernels in its interpreter. Triton picks interpreter vs compiler when a
# kernel is decorated, so this must happen before anything imports triton (or `kernels`).
try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # let the tests themselves report the missing dependency
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# `python -m pytest tests` from the repo root: make the top-level modules importable.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def logp64():
    """logp64(model, tok, question, path): log p(path + EOS | prompt) from the model's own logits in
    float64 (log_softmax over the whole text, summed over the path's tokens and EOS), a truth that
    shares no code with distill.py or kernels/."""
    import torch

    from data import format_prompt

    def logp(model, tok, q, y):
        p = tok(format_prompt(q), add_special_tokens=False).input_ids
        a = tok(y, add_special_tokens=False).input_ids + [tok.eos_token_id]
        ids = torch.tensor([p + a])
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=ids).logits.double()[0, :-1], -1)
        return sum(lp[t, ids[0, t + 1]].item() for t in range(len(p) - 1, len(p) + len(a) - 1))
    return logp
