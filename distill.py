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

from data import format_prompt
from kernels import dard_loss_fused, head_is_plain_linear, kept_tokens, seq_logprob
from models import crash_point, hidden_and_head, to_device

IGNORE = -100


# -----------------------------------------------------------------------------
# Token ids: every text is tokenized once; batches are collated from the cached ids

def encode(tokenizer, questions, paths) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, path ids + EOS) per row. Prompt and path are tokenized apart (no merges across
    the boundary), in one batched tokenizer call each; EOS ends every path (spec §1), so a model
    trained here stops generating by itself."""
    prompts = tokenizer([format_prompt(q) for q in questions], add_special_tokens=False).input_ids
    answers = tokenizer(list(paths), add_special_tokens=False).input_ids
    eos = tokenizer.eos_token_id
    return [(p, a + [eos]) for p, a in zip(prompts, answers)]


def collate(rows, pad_id, device=None) -> dict:
    """A right-padded batch of encoded rows (`encode`), never cut: a row that must not exceed a
    length is left out before it gets here (TokenizedSet, distill), and counted.

    Returns input_ids (B, T), labels (B, T) already shifted (labels[t] is the token after input t;
    prompt positions and padding are -100), n_tokens (B,) = path tokens + EOS, the |y| of spec §4,
    and tok, the flat indices of the labelled positions (kernels.kept_tokens), found here on the host
    so that the head never waits for the device to find them.
    No attention mask: with right padding no real position of a causal model attends to a pad, so
    the model runs its unmasked (flash) attention; labels keep the pads out of every loss.
    """
    seqs = []
    for p, a in rows:
        ids, lab = p + a, ([IGNORE] * len(p) + a)[1:] + [IGNORE]  # shifted: position t predicts token t+1
        seqs.append((ids, lab))
    T = max(len(ids) for ids, _ in seqs)
    input_ids = torch.tensor([ids + [pad_id] * (T - len(ids)) for ids, _ in seqs])
    labels = torch.tensor([lab + [IGNORE] * (T - len(lab)) for _, lab in seqs])
    enc = dict(input_ids=input_ids, labels=labels, n_tokens=(labels != IGNORE).sum(1), tok=kept_tokens(labels, IGNORE))
    return {k: to_device(v, device) for k, v in enc.items()}


def encode_pairs(tokenizer, questions, paths, device=None) -> dict:
    """`collate(encode(...))`: one batch straight from texts."""
    return collate(encode(tokenizer, questions, paths), tokenizer.pad_token_id, device)


class TokenizedSet:
    """A party's (question, solution) examples, tokenized once, served as length-bucketed batches.
    Examples longer than `max_len` tokens (prompt + solution + EOS) are left out, never cut; `dropped`
    counts them, and with a `name` one line says so."""

    def __init__(self, tokenizer, examples, max_len=None, name=None):
        rows = encode(tokenizer, [e["question"] for e in examples], [e["answer"] for e in examples])
        self.rows = [r for r in rows if max_len is None or len(r[0]) + len(r[1]) <= max_len]
        self.dropped, self.pad_id = len(rows) - len(self.rows), tokenizer.pad_token_id
        self.lengths = [len(p) + len(a) for p, a in self.rows]
        if self.dropped and name:
            print(f"{name}: {self.dropped} of {len(rows)} examples are longer than --max_len {max_len} tokens "
                  "and are left out", flush=True)

    def __len__(self):
        return len(self.rows)

    def batch(self, idx, device=None) -> dict:
        return collate([self.rows[i] for i in idx], self.pad_id, device)

    def batches(self, batch_size, rng: random.Random, group=16):
        """Endless batches of `batch_size` row indices (all rows if fewer): a stream of random
        permutations is cut into groups of `group` batches; each group is sorted by length and split,
        and its batches come out in random order. Every row once per pass, little padding."""
        bs = min(batch_size, len(self.rows))
        if bs == 0:
            return
        stream = []
        while True:
            while len(stream) < bs * group:
                perm = list(range(len(self.rows)))
                rng.shuffle(perm)
                stream += perm
            chunk, stream = sorted(stream[:bs * group], key=self.lengths.__getitem__), stream[bs * group:]
            batches = [chunk[i:i + bs] for i in range(0, len(chunk), bs)]
            rng.shuffle(batches)
            yield from batches


def as_tokenized(data, tokenizer, max_len=None) -> TokenizedSet:
    return data if isinstance(data, TokenizedSet) else TokenizedSet(tokenizer, data, max_len)


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


def warm_up(model, tokenizer, examples, steps: int, batch_size: int = 32, lr: float = 3e-3, seed: int = 0,
            device="cpu", desc="warm-up", max_len: int = 512) -> float:
    """`steps` AdamW steps of SFT on (question, gold solution) pairs (spec §6: each party warmed up
    on its own data before the rounds); returns the mean loss of the last 20 steps. Call it inside
    `autocast(...)` for bf16 on a GPU."""
    rng = random.Random(seed)
    data = TokenizedSet(tokenizer, examples, max_len, name=desc)
    model.to(device).train()
    opt = make_optimizer(model, lr, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, min(50, steps // 10))) * max(0.1, 1 - s / steps))
    batches, tail, last = data.batches(batch_size, rng), [], None
    bar = Progress(steps, desc)
    for step in range(steps):
        loss = sft_loss(model, data.batch(next(batches), device))
        optimizer_step(model, opt, loss)
        sched.step()
        last = loss.detach()
        if step >= steps - 20:
            tail.append(last)
        bar.step(lambda: f"loss {last.item():.3f}")
        crash_point("warm_up")  # a test hook (tests/test_reliability.py); nothing unless LADA_CRASH_AT says so
    bar.close()
    model.eval()
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
