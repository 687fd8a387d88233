"""distill.py: domain adaptive reasoning distillation (DARD, spec §4), the SFT losses, and the
training step the federated loop calls.

Every loss here works on per-sequence log-probabilities: log p(y|x) is the sum over the path's
tokens (prompt masked) under the model's own tokenizer, computed by the fused kernel of
`kernels/` from the final hidden states and the head weight, so no tokens x vocabulary tensor is
held on the GPU.
"""
import random
import sys
import time
import warnings
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from batching import IGNORE, TokenizedSet, as_tokenized, collate, collate_pairs, encode
from kernels import dard_loss_fused, head_is_plain_linear, seq_logprob
from models import hidden_and_head, to_device
from store import crash_point

_warned = set()


def _head_inputs(model, enc):
    """(hidden, weight) for the fused kernel; None (with a one-line warning) when the head is not plain.
    Under autocast the hidden states come in autocast's dtype, as autocast would run the model's own
    nn.Linear head: the final norm of a Llama, Qwen2 or GPT-2 returns the fp32 residual stream, which
    would otherwise send a bf16 run's head down the kernels' fp32 path."""
    if head_is_plain_linear(model):
        hidden, weight = hidden_and_head(model, enc["input_ids"])
        kind = hidden.device.type
        if torch.is_autocast_enabled(kind) and hidden.dtype == torch.float32:
            hidden = hidden.to(torch.get_autocast_dtype(kind))
        return hidden, weight
    name = type(model).__name__
    if name not in _warned:
        _warned.add(name)
        warnings.warn(f"{name}: output head is not a plain linear layer; using materialized logits")
    return None


def sequence_logps(model, enc) -> torch.Tensor:
    """Summed log p(y|x) per row (B,), differentiable (spec §1: the joint path probability)."""
    hw = _head_inputs(model, enc)
    if hw is not None:
        return seq_logprob(hw[0], hw[1], enc["labels"], tok=enc.get("tok"))
    logits = model(input_ids=enc["input_ids"]).logits.float()
    lab = enc["labels"]
    lp = torch.gather(F.log_softmax(logits, -1), 2, lab.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return (lp * (lab != IGNORE)).sum(1)


@torch.no_grad()
def score_rows(model, rows, pad_id, batch_size=256, device="cpu"):
    """(summed log-probs (n,), token counts (n,)) of encoded rows under `model`, fp32 on the CPU.
    Rows are scored in length order (little padding), results returned in input order; one
    device-to-host copy at the end."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]) + len(rows[i][1]))
    lps, ns = [], []
    for i in range(0, len(order), batch_size):
        enc = collate([rows[j] for j in order[i:i + batch_size]], pad_id, device)
        lps.append(sequence_logps(model, enc).float())
        ns.append(enc["n_tokens"])
    model.train(was_training)
    if not lps:
        return torch.zeros(0), torch.zeros(0, dtype=torch.long)
    inv = torch.empty(len(order), dtype=torch.long)
    inv[torch.tensor(order)] = torch.arange(len(order))
    return torch.cat(lps).cpu()[inv], torch.cat(ns).cpu()[inv]


def score_paths(model, tokenizer, questions, paths, batch_size=256, device="cpu"):
    """`score_rows` straight from texts (whole paths: scores are never of a cut sequence)."""
    return score_rows(model, encode(tokenizer, questions, paths), tokenizer.pad_token_id, batch_size, device)


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


def dard_v2_pair(correct_pos: bool, correct_neg: bool) -> str:
    """Spec §4': what DARD v2 does with a pair (y+ the sent path, y- the student's own): "contrast"
    (y+ correct, y- wrong: contrast and imitation), "imitation" (both correct: imitation only) or
    "dropped" (y+ wrong: nothing to learn from it)."""
    if not correct_pos:
        return "dropped"
    return "imitation" if correct_neg else "contrast"


def dard_v2_loss(pi_pos, pi_neg, ref_pos, ref_neg, w, beta, eps, alpha, n_pos):
    """Per-example DARD v2 loss of spec §4' on per-sequence log-probs (the pairs it keeps: y+ correct).

    pi_pos, pi_neg, ref_pos, ref_neg: (B,) summed log-probs under pi_theta and pi_ref
    w: (B,) 1 for a contrast pair (y- wrong), 0 for imitation only (y- correct; pi_neg, ref_neg unread)
    beta, eps, alpha: floats (target 1 - eps: conservative DPO, a finite optimum at sigma(h) = 1 - eps)
    n_pos: (B,) token count of y+. Returns (losses (B,), diagnostics dict of detached (B,) tensors).
    L = -w [(1-eps) log sigma(h) + eps log sigma(-h)] + alpha NLL(y+)/|y+|
    """
    w = w.to(pi_pos.dtype)
    neg = torch.where(w > 0, pi_neg - ref_neg, torch.zeros_like(pi_neg))
    h = beta * ((pi_pos - ref_pos) - neg)  # spec §4: h_theta
    l_con = -w * ((1 - eps) * F.logsigmoid(h) + eps * F.logsigmoid(-h))  # spec §4': the bounded contrast
    l_nll = alpha * (-pi_pos / n_pos.clamp_min(1))  # spec §4': alpha * NLL(y+)/|y+|
    return l_con + l_nll, dict(h=h.detach(), l_contrast=l_con.detach(), l_nll=l_nll.detach())


def sft_loss(model, enc) -> torch.Tensor:
    """Mean over rows of NLL(y|x)/|y| (per-token NLL of each path, then the batch mean)."""
    return (-sequence_logps(model, enc) / enc["n_tokens"].clamp_min(1)).mean()


# -----------------------------------------------------------------------------
# Training steps: warm-up, the local step, distillation. No host sync inside a loop: losses are
# summed on the device and read once at the end (or when a progress line is printed).

def autocast(device, dtype: str):
    """bf16 autocast on CUDA when dtype is 'bf16' (weights and optimizer stay fp32); nothing otherwise."""
    if dtype == "bf16" and torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def make_optimizer(model, lr, betas=(0.9, 0.999)):
    """AdamW without weight decay over the trainable parameters (all of them, or a LoRA party's
    adapters); the fused CUDA implementation when the weights are on a GPU."""
    fused = next(model.parameters()).is_cuda
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=betas, fused=fused or None)


@contextmanager
def lr_scaled(opt, scale: float):
    """The optimizer's learning rates times `scale` inside the block, as they were after it
    (--local_lr_scale for the local step, --distill_lr_scale for distillation)."""
    lrs = [g["lr"] for g in opt.param_groups]
    for g in opt.param_groups:
        g["lr"] = g["lr"] * scale
    try:
        yield
    finally:
        for g, lr in zip(opt.param_groups, lrs):
            g["lr"] = lr


def optimizer_step(model, opt, loss):
    """Backward, clip the gradient norm to 1, step: the update every training loop here makes."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()


class Progress:
    """A tqdm bar on a terminal; off one (a log, a pipe) a line per tenth: done/total, elapsed, ETA.
    `step(info)` takes a callable for the postfix, called only when something is shown (a host sync
    at most every 1% of the work, never per step)."""

    def __init__(self, total: int, desc: str):
        self.total, self.desc, self.done, self.t0 = total, desc, 0, time.time()
        self.tty = sys.stderr.isatty()
        self.bar = tqdm(total=total, desc=desc, leave=False) if self.tty and total > 1 else None
        self.every = max(1, total // (100 if self.tty else 10))

    def step(self, info=None):
        self.done += 1
        if self.done % self.every and self.done != self.total:
            return
        text = info() if info is not None else ""
        if self.bar is not None:
            self.bar.update(self.done - self.bar.n)
            if text:
                self.bar.set_postfix_str(text, refresh=False)
        elif not self.tty:
            el = time.time() - self.t0
            eta = el / self.done * (self.total - self.done)
            print(f"{self.desc}: {self.done}/{self.total}, {el:.0f} s, ETA {eta:.0f} s" + (f", {text}" if text else ""),
                  flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


FIRST_LOSSES = 10  # warm-up losses kept with a warmed-up model (a short re-run checks them)


def warm_up(model, tokenizer, examples, steps: int, batch_size: int = 32, lr: float = 3e-3, seed: int = 0,
            device="cpu", desc="warm-up", max_len: int = 512, first: list | None = None, stop: int | None = None) -> float:
    """`steps` AdamW steps of SFT on (question, gold solution) pairs (spec §6: each party warmed up
    on its own data before the rounds); returns the mean loss of the last 20 steps. Call it inside
    `autocast(...)` for bf16 on a GPU. `first` (a list) receives the losses of the first FIRST_LOSSES
    steps, and `stop` ends the same schedule after that many steps: what tests/test_bases.py re-runs
    of a shipped base's warm-up."""
    rng = random.Random(seed)
    data = TokenizedSet(tokenizer, examples, max_len, name=desc)
    model.to(device).train()
    opt = make_optimizer(model, lr, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, min(50, steps // 10))) * max(0.1, 1 - s / steps))
    batches, tail, last = data.batches(batch_size, rng), [], None
    bar = Progress(steps, desc)
    for step in range(steps if stop is None else min(stop, steps)):
        loss = sft_loss(model, data.batch(next(batches), device))
        optimizer_step(model, opt, loss)
        sched.step()
        last = loss.detach()
        if step >= steps - 20:
            tail.append(last)
        if first is not None and step < FIRST_LOSSES:
            first.append(last)
        bar.step(lambda: f"loss {last.item():.3f}")
        crash_point("warm_up")  # a test hook (tests/test_reliability.py); nothing unless LADA_CRASH_AT says so
    bar.close()
    model.eval()
    if first is not None:
        first[:] = [float(x) for x in first]
    return float(torch.stack(tail).mean()) if tail else float("nan")


def local_batch_loss(model, local: TokenizedSet, batches, device):
    """L_local of spec §4: SFT on the next batch of the student's own local data."""
    return sft_loss(model, local.batch(next(batches), device))


def local_sft(model, tokenizer, opt, local_data, steps, batch_size, rng, device="cpu", max_len=None,
              lr_scale: float = 1.0) -> float:
    """Spec §2 step 1: `steps` SFT steps on the party's own data, at the optimizer's lr times
    `lr_scale` (--local_lr_scale). Returns the mean loss."""
    if steps <= 0 or not local_data:
        return float("nan")
    local = as_tokenized(local_data, tokenizer, max_len)
    batches = local.batches(batch_size, rng)
    model.train()
    tot = 0.0
    with lr_scaled(opt, lr_scale):
        for _ in range(steps):
            loss = local_batch_loss(model, local, batches, device)
            optimizer_step(model, opt, loss)
            tot = tot + loss.detach()
    model.eval()
    return float(tot) / steps


def distill(model, tokenizer, opt, samples, local_data, loss: str, cfg: dict, rng: random.Random,
            device="cpu") -> dict:
    """Train `model` on the allocated samples for cfg['distill_epochs'] passes (spec §2 step 6).

    samples: list of dicts with question, y_pos, y_neg, q (teacher target), correct_pos (bool).
    loss: 'dard' (spec §4) or 'sft' (NLL of y+ per token; the ablations and fedmkt).
    local_data: the student's own examples (a TokenizedSet, or a list of dicts).
    Every step adds lam * L_local on a batch of local data. Returns mean loss terms.
    """
    beta, alpha, lam, bs = cfg["beta"], cfg["alpha"], cfg["lam"], cfg["distill_batch"]
    max_len = cfg.get("max_len")
    if loss not in ("dard", "sft"):
        raise ValueError(f"unknown loss '{loss}'")
    if loss == "dard":  # identical paths carry no contrast (spec §4): drop them
        samples = [s for s in samples if s["y_pos"] != s["y_neg"]]
    if not samples:
        return dict(steps=0)
    pad, n_in = tokenizer.pad_token_id, len(samples)
    pos = encode(tokenizer, [s["question"] for s in samples], [s["y_pos"] for s in samples])  # once for all epochs
    neg = encode(tokenizer, [s["question"] for s in samples], [s["y_neg"] for s in samples]) if loss == "dard" else pos
    fits = [max_len is None or max(len(p[0]) + len(p[1]), len(n[0]) + len(n[1])) <= max_len for p, n in zip(pos, neg)]
    if not all(fits):  # never cut a path: a pair that does not fit is left out, and counted
        samples, pos, neg = ([x for x, f in zip(xs, fits) if f] for xs in (samples, pos, neg))
    if not samples:
        return dict(steps=0, too_long=n_in)
    if loss == "dard":  # pi_ref = the student as this distillation starts (frozen snapshot)
        ref_pos, _ = score_rows(model, pos, pad, 2 * bs, device)
        ref_neg, _ = score_rows(model, neg, pad, 2 * bs, device)
        q_all = torch.tensor([s["q"] for s in samples], dtype=torch.float32)
        a_all = alpha * torch.tensor([float(s["correct_pos"]) for s in samples])
    local = as_tokenized(local_data, tokenizer, max_len) if lam > 0 else None
    local_batches = local.batches(bs, rng) if local is not None and len(local) else None
    model.train()
    order = list(range(len(samples)))
    totals, steps = {}, 0
    with lr_scaled(opt, cfg.get("distill_lr_scale", 1.0)):  # the distillation's own learning rate
        for _ in range(cfg["distill_epochs"]):
            rng.shuffle(order)
            for i in range(0, len(order), bs):
                idx = order[i:i + bs]
                if loss == "dard":
                    # Liger's layout: rows 0..B-1 are y+, rows B..2B-1 are y- of the same questions
                    enc = collate([pos[j] for j in idx] + [neg[j] for j in idx], pad, device)
                    ref = to_device(torch.cat([ref_pos[idx], ref_neg[idx]]), device)
                    q, a = to_device(q_all[idx], device), to_device(a_all[idx], device)
                    hw = _head_inputs(model, enc)
                    if hw is not None:
                        l_main, _ = dard_loss_fused(hw[0], hw[1], enc["labels"], ref, q, beta, a, tok=enc["tok"])
                    else:
                        lp = sequence_logps(model, enc)
                        B = len(idx)
                        l_main = dard_loss(lp[:B], lp[B:], ref[:B], ref[B:], q, beta, a, enc["n_tokens"][:B])[0].mean()
                else:
                    l_main = sft_loss(model, collate([pos[j] for j in idx], pad, device))
                l_local = local_batch_loss(model, local, local_batches, device) if local_batches else torch.zeros(())
                total = l_main + lam * l_local  # spec §4: L = L_DARD + alpha*... + lam * L_local
                optimizer_step(model, opt, total)
                steps += 1
                for k, v in (("loss", total), (loss, l_main), ("anchor", l_local)):  # "anchor": not the local step's "local"
                    totals[k] = totals.get(k, 0.0) + v.detach()
    model.eval()
    return dict({k: float(v) / steps for k, v in totals.items()}, steps=steps, n=len(samples),
                too_long=n_in - len(samples))


def distill_plugin(model, tokenizer, opt, host, pairs, local_data, plug_loss: str, cfg: dict, rng: random.Random,
                   device="cpu") -> dict:
    """LaDa v2 as a plug-in to its host (spec §4'): one optimizer at the host's distillation rate, whose
    every step is  L = L_host(a batch of H_k) + gamma * L_plug(a batch of A_k) + lam * L_local.

    host:  the host's allocation H_k, dicts with question, y_pos (SFT on the sent path, as `fedmkt`)
    pairs: the plug-in's picks A_k (a subset of H_k), dicts with question, y_pos, y_neg, correct_pos,
           correct_neg; a pair with a wrong y+ is dropped, one with a correct y- is imitation only
    plug_loss: 'dard2' (DARD v2: bounded contrast + alpha * NLL(y+)) or 'sft' (lada-sft: alpha * NLL(y+)
           alone, DARD v2 without its contrast, on the same pairs at the same gamma)
    The host sets the schedule (cfg['distill_epochs'] passes over H_k in batches of distill_batch); the
    kept pairs are drawn from an endless shuffled stream, one batch a step.
    Returns the mean loss terms, steps, and "plugin": pair counts by kind, "trained" (indices into
    `pairs` of the kept pairs that fit max_len), "rewarded" (those and the dropped picks: the pairs whose
    rewards update the filter, a dropped one's 0, as §3.3 gives a wrong path) and the mean change of
    log p per token against pi_ref (the model as this call starts) of the trained y+ and of the y- of
    contrast pairs, over the trained pairs ("dlogp_pos", "dlogp_neg"; None without such pairs).
    """
    if plug_loss not in ("dard2", "sft"):
        raise ValueError(f"unknown plug-in loss '{plug_loss}'")
    beta, eps, alpha, gamma, lam, bs = cfg["beta"], cfg["eps"], cfg["alpha"], cfg["gamma"], cfg["lam"], cfg["distill_batch"]
    max_len, pad = cfg.get("max_len"), tokenizer.pad_token_id
    fits = lambda rows: [max_len is None or len(p) + len(a) <= max_len for p, a in rows]  # noqa: E731
    kinds = [dard_v2_pair(p["correct_pos"], p["correct_neg"]) for p in pairs]
    diag = {k: kinds.count(k) for k in ("contrast", "imitation", "dropped")}
    h_rows = encode(tokenizer, [s["question"] for s in host], [s["y_pos"] for s in host])
    h_rows = [r for r, f in zip(h_rows, fits(h_rows)) if f]  # never cut a path: too long is left out
    keep = [i for i, k in enumerate(kinds) if k != "dropped"]
    qs = [pairs[i]["question"] for i in keep]
    pos = encode(tokenizer, qs, [pairs[i]["y_pos"] for i in keep])
    neg = encode(tokenizer, qs, [pairs[i]["y_neg"] for i in keep])
    ok = [a and b for a, b in zip(fits(pos), fits(neg))]
    keep, pos, neg = ([x for x, o in zip(xs, ok) if o] for xs in (keep, pos, neg))
    w = [int(kinds[i] == "contrast") for i in keep]  # spec §4': contrast only where y- is wrong
    # the filter's feedback (§3.3): each kept pair trained on, and each dropped pick, whose wrong y+ earns 0
    rewarded = sorted(keep + [i for i, k in enumerate(kinds) if k == "dropped"])
    diag.update(trained=keep, rewarded=rewarded, too_long=len(host) - len(h_rows) + sum(not o for o in ok),
                dlogp_pos=None, dlogp_neg=None)
    if not h_rows:
        return dict(steps=0, plugin=dict(diag, trained=[], rewarded=[]))
    # pi_ref: the student as this distillation starts; y- rows only where a contrast reads them
    ref_pos, n_pos = score_rows(model, pos, pad, 2 * bs, device)
    con = [j for j in range(len(keep)) if w[j]]
    ref_neg, n_neg = torch.zeros(len(keep)), torch.ones(len(keep), dtype=torch.long)
    if con:
        r, n = score_rows(model, [neg[j] for j in con], pad, 2 * bs, device)
        ref_neg[con], n_neg[con] = r, n
    local = as_tokenized(local_data, tokenizer, max_len) if lam > 0 else None
    local_batches = local.batches(bs, rng) if local is not None and len(local) else None
    plug_batches = _endless(len(keep), bs, rng) if keep else None
    model.train()
    order, totals, steps = list(range(len(h_rows))), {}, 0
    with lr_scaled(opt, cfg.get("distill_lr_scale", 1.0)):  # the host's distillation rate
        for _ in range(cfg["distill_epochs"]):
            rng.shuffle(order)
            for i in range(0, len(order), bs):
                l_host = sft_loss(model, collate([h_rows[j] for j in order[i:i + bs]], pad, device))
                l_plug = torch.zeros((), device=l_host.device)
                if plug_batches is not None:
                    idx = next(plug_batches)
                    if plug_loss == "sft":  # gamma * alpha * NLL(y+)/|y+| on the (all correct) y+ of A_k
                        l_plug = alpha * sft_loss(model, collate([pos[j] for j in idx], pad, device))
                    else:
                        l_plug = _dard_v2_batch(model, [pos[j] for j in idx], [neg[j] for j in idx], [w[j] for j in idx],
                                                torch.cat([ref_pos[idx], ref_neg[idx]]), beta, eps, alpha, pad, device)
                l_local = local_batch_loss(model, local, local_batches, device) if local_batches else torch.zeros(())
                total = l_host + gamma * l_plug + lam * l_local  # spec §4': L_host + gamma L_DARDv2 + lam L_local
                optimizer_step(model, opt, total)
                steps += 1
                for k, v in (("loss", total), ("sft", l_host), (plug_loss, l_plug), ("anchor", l_local)):
                    totals[k] = totals.get(k, 0.0) + v.detach()
    model.eval()
    if keep:  # what training did to the paths against pi_ref (spec §4': y+ below pi_ref is DPOP's failure)
        after_pos, _ = score_rows(model, pos, pad, 2 * bs, device)
        diag["dlogp_pos"] = float(((after_pos - ref_pos) / n_pos.clamp_min(1)).mean())
        if con:
            after_neg, _ = score_rows(model, [neg[j] for j in con], pad, 2 * bs, device)
            diag["dlogp_neg"] = float(((after_neg - ref_neg[con]) / n_neg[con].clamp_min(1)).mean())
    return dict({k: float(v) / steps for k, v in totals.items()}, steps=steps, n=len(h_rows), plugin=diag)


def _endless(n, bs, rng):
    """Endless batches of indices 0..n-1: shuffled passes, each cut into batches of bs (all n if fewer)."""
    while True:
        perm = list(range(n))
        rng.shuffle(perm)
        for i in range(0, n, bs):
            yield perm[i:i + bs]


def _dard_v2_batch(model, pos, neg, w, ref, beta, eps, alpha, pad, device):
    """The batch-mean DARD v2 loss of one batch of kept pairs: the fused kernel with q = 1 - eps and the
    per-pair contrast weight w (kernels.dard_loss_fused), or its reference where the head is not plain."""
    B = len(pos)
    enc = collate_pairs(pos, neg, w, pad, device)
    ref = to_device(ref, device)
    q = to_device(torch.full((B,), 1 - eps), device)
    wt = to_device(torch.tensor(w, dtype=torch.float32), device)
    hw = _head_inputs(model, enc)
    if hw is not None:
        return dard_loss_fused(hw[0], hw[1], enc["labels"], ref, q, beta, alpha, tok=enc["tok"], w=wt)[0]
    lp = sequence_logps(model, enc)
    return dard_v2_loss(lp[:B], lp[B:], ref[:B], ref[B:], wt, beta, eps, alpha, enc["n_tokens"][:B])[0].mean()
