"""distill.py: domain adaptive reasoning distillation (DARD, spec §4), the SFT losses, and the
training step the federated loop calls.

Every loss here works on per-sequence log-probabilities: log p(y|x) is the sum over the path's
tokens (prompt masked) under the model's own tokenizer, computed by the fused kernel of
`kernels/` from the final hidden states and the head weight, so no tokens x vocabulary tensor is
held on the GPU.
"""
import random
import warnings

import torch
import torch.nn.functional as F

from data import format_prompt
from kernels import dard_loss_fused, head_is_plain_linear, seq_logprob
from models import hidden_and_head

IGNORE = -100


# -----------------------------------------------------------------------------
# Batches of (question, path) pairs for any tokenizer

def encode_pairs(tokenizer, questions, paths, max_len=None, device=None) -> dict:
    """Prompt and path tokenized separately (no merges across the boundary), EOS appended.

    Returns input_ids (B, T), attention_mask (B, T), labels (B, T) already shifted (labels[t] is
    the token after input t; prompt positions and padding are -100) and n_tokens (B,) = path
    tokens + EOS, the |y| of spec §4.
    """
    rows = []
    prompts = tokenizer([format_prompt(q) for q in questions], add_special_tokens=False).input_ids  # one batched
    answers = tokenizer(list(paths), add_special_tokens=False).input_ids  # call each: ~10x faster than per text
    for p, a in zip(prompts, answers):
        a = a + [tokenizer.eos_token_id]
        ids, lab = p + a, [IGNORE] * len(p) + a
        lab = lab[1:] + [IGNORE]  # shift: position t predicts token t+1
        if max_len is not None:
            ids, lab = ids[:max_len], lab[:max_len]
        rows.append((ids, lab))
    T = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([ids + [pad] * (T - len(ids)) for ids, _ in rows])
    labels = torch.tensor([lab + [IGNORE] * (T - len(lab)) for _, lab in rows])
    mask = torch.tensor([[1] * len(ids) + [0] * (T - len(ids)) for ids, _ in rows])
    enc = dict(input_ids=input_ids, attention_mask=mask, labels=labels, n_tokens=(labels != IGNORE).sum(1))
    return {k: v.to(device) for k, v in enc.items()} if device is not None else enc


_warned = set()


def _head_inputs(model, enc):
    """(hidden, weight) for the fused kernel; None (with a one-line warning) when the head is not plain."""
    if head_is_plain_linear(model):
        return hidden_and_head(model, enc["input_ids"], enc["attention_mask"])
    name = type(model).__name__
    if name not in _warned:
        _warned.add(name)
        warnings.warn(f"{name}: output head is not a plain linear layer; using materialized logits")
    return None


def sequence_logps(model, enc) -> torch.Tensor:
    """Summed log p(y|x) per row (B,), differentiable (spec §1: the joint path probability)."""
    hw = _head_inputs(model, enc)
    if hw is not None:
        return seq_logprob(hw[0], hw[1], enc["labels"])
    logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits.float()
    lab = enc["labels"]
    lp = torch.gather(F.log_softmax(logits, -1), 2, lab.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return (lp * (lab != IGNORE)).sum(1)


@torch.no_grad()
def score_paths(model, tokenizer, questions, paths, batch_size=32, device="cpu", max_len=None):
    """(summed log-probs (n,), token counts (n,)) of each path under `model`, on CPU, fp32."""
    was_training = model.training
    model.eval()
    lps, ns = [], []
    for i in range(0, len(questions), batch_size):
        enc = encode_pairs(tokenizer, questions[i:i + batch_size], paths[i:i + batch_size], max_len, device)
        lps.append(sequence_logps(model, enc).float().cpu())
        ns.append(enc["n_tokens"].cpu())
    model.train(was_training)
    if not lps:
        return torch.zeros(0), torch.zeros(0, dtype=torch.long)
    return torch.cat(lps), torch.cat(ns)


# -----------------------------------------------------------------------------
# Losses (spec §4)

def teacher_targets(t_logp_pos, t_logp_neg, chars_pos, chars_neg, correct_pos, correct_neg, tau=0.1):
    """q: the teacher's soft preference for y+ over y- (spec §4).

    m_t = (log pi_t(y+|x)/c+ - log pi_t(y-|x)/c-) / tau, q = sigmoid(m_t), overridden to 1 (0) when
    only y+ (y-) is correct. All arguments are (B,) tensors; c are characters of the paths.
    """
    m_t = (t_logp_pos / chars_pos - t_logp_neg / chars_neg) / tau
    q = torch.sigmoid(m_t)
    correct_pos, correct_neg = correct_pos.bool(), correct_neg.bool()
    q = torch.where(correct_pos & ~correct_neg, torch.ones_like(q), q)
    q = torch.where(~correct_pos & correct_neg, torch.zeros_like(q), q)
    return q


def dard_loss(pi_pos, pi_neg, ref_pos, ref_neg, q, beta, alpha, n_pos):
    """Per-example DARD loss of spec §4 on per-sequence log-probs.

    pi_pos, pi_neg: (B,) log pi_theta(y+|x), log pi_theta(y-|x) (summed over path tokens)
    ref_pos, ref_neg: (B,) the same under pi_ref (the student at the start of the round)
    q: (B,) teacher targets; beta: float; alpha: float or (B,) (the caller passes alpha * correct(y+))
    n_pos: (B,) token count of y+ under the student's tokenizer.
    Returns (losses (B,), diagnostics dict of detached (B,) tensors).
    """
    h = beta * ((pi_pos - ref_pos) - (pi_neg - ref_neg))  # spec §4: h_theta
    l_dard = -(q * F.logsigmoid(h) + (1 - q) * F.logsigmoid(-h))  # spec §4: L_DARD, DPO-like with soft q
    l_nll = alpha * (-pi_pos / n_pos.clamp_min(1))  # spec §4: alpha * correct(y+) * NLL(y+)/|y+|
    diag = dict(h=h.detach(), reward_pos=(beta * (pi_pos - ref_pos)).detach(),
                reward_neg=(beta * (pi_neg - ref_neg)).detach(), l_dard=l_dard.detach(), l_nll=l_nll.detach())
    return l_dard + l_nll, diag


def sft_loss(model, enc) -> torch.Tensor:
    """Mean over rows of NLL(y|x)/|y| (per-token NLL of each path, then the batch mean)."""
    return (-sequence_logps(model, enc) / enc["n_tokens"].clamp_min(1)).mean()


# -----------------------------------------------------------------------------
# The training step used by the federated loop

def optimizer_step(model, opt, loss):
    """Backward, clip the gradient norm to 1, step: the update every training loop here makes."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()


def local_batch_loss(model, tokenizer, local_data, batch_size, rng, device, max_len=None):
    """L_local of spec §4: SFT on a random batch of the student's own local data."""
    batch = rng.sample(local_data, min(batch_size, len(local_data)))
    enc = encode_pairs(tokenizer, [e["question"] for e in batch], [e["answer"] for e in batch], max_len, device)
    return sft_loss(model, enc)


def distill(model, tokenizer, opt, samples, local_data, loss: str, cfg: dict, rng: random.Random,
            device="cpu") -> dict:
    """Train `model` on the allocated samples for cfg['distill_epochs'] passes (spec §2 step 6).

    samples: list of dicts with question, y_pos, y_neg, q (teacher target), correct_pos (bool).
    loss: 'dard' (spec §4) or 'sft' (NLL of y+ per token; the ablations and fedmkt).
    Every step adds lam * L_local on a batch of `local_data`. Returns mean loss terms.
    """
    beta, alpha, lam, bs = cfg["beta"], cfg["alpha"], cfg["lam"], cfg["distill_batch"]
    max_len = cfg.get("max_len")
    if loss == "dard":  # identical paths carry no contrast (spec §4): drop them
        samples = [s for s in samples if s["y_pos"] != s["y_neg"]]
    if not samples:
        return dict(steps=0)
    qs = [s["question"] for s in samples]
    if loss == "dard":  # pi_ref = the student before this round's distillation (frozen snapshot)
        ref_pos, _ = score_paths(model, tokenizer, qs, [s["y_pos"] for s in samples], bs, device, max_len)
        ref_neg, _ = score_paths(model, tokenizer, qs, [s["y_neg"] for s in samples], bs, device, max_len)
    model.train()
    order = list(range(len(samples)))
    totals, steps = {}, 0
    for _ in range(cfg["distill_epochs"]):
        rng.shuffle(order)
        for i in range(0, len(order), bs):
            idx = order[i:i + bs]
            batch = [samples[j] for j in idx]
            q_batch = [s["question"] for s in batch]
            if loss == "dard":
                # Liger's layout: rows 0..B-1 are y+, rows B..2B-1 are y- of the same questions
                enc = encode_pairs(tokenizer, q_batch + q_batch, [s["y_pos"] for s in batch] +
                                   [s["y_neg"] for s in batch], max_len, device)
                ref = torch.cat([ref_pos[idx], ref_neg[idx]]).to(device)
                q = torch.tensor([s["q"] for s in batch], device=device, dtype=torch.float32)
                a = alpha * torch.tensor([float(s["correct_pos"]) for s in batch], device=device)
                hw = _head_inputs(model, enc)
                if hw is not None:
                    l_main, _ = dard_loss_fused(hw[0], hw[1], enc["labels"], ref, q, beta, a)
                else:
                    lp = sequence_logps(model, enc)
                    B = len(batch)
                    l_main = dard_loss(lp[:B], lp[B:], ref[:B], ref[B:], q, beta, a, enc["n_tokens"][:B])[0].mean()
            elif loss == "sft":
                enc = encode_pairs(tokenizer, q_batch, [s["y_pos"] for s in batch], max_len, device)
                l_main = sft_loss(model, enc)
            else:
                raise ValueError(f"unknown loss '{loss}'")
            l_local = local_batch_loss(model, tokenizer, local_data, bs, rng, device, max_len) if lam > 0 else 0.0
            total = l_main + lam * l_local  # spec §4: L = L_DARD + alpha*... + lam * L_local
            optimizer_step(model, opt, total)
            steps += 1
            for k, v in (("loss", total), (loss, l_main), ("local", l_local)):
                totals[k] = totals.get(k, 0.0) + float(v.detach() if torch.is_tensor(v) else v)
    model.eval()
    return dict({k: v / steps for k, v in totals.items()}, steps=steps, n=len(samples))


def local_sft(model, tokenizer, opt, local_data, steps, batch_size, rng, device="cpu", max_len=None) -> float:
    """Spec §2 step 1: `steps` SFT steps on the party's own data. Returns the mean loss."""
    if steps <= 0 or not local_data:
        return float("nan")
    model.train()
    tot = 0.0
    for _ in range(steps):
        loss = local_batch_loss(model, tokenizer, local_data, batch_size, rng, device, max_len)
        optimizer_step(model, opt, loss)
        tot += loss.item()
    model.eval()
    return tot / steps
