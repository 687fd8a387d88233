"""distill.py: batching, the DARD loss against hand-computed values and the fused kernel, training steps."""
import math
import random

import pytest
import torch

import data
import config
import parties
import batching
import distill
import kernels
import models


@pytest.fixture(scope="module")
def tok():
    corpus = [data.format_prompt(p["question"]) + p["answer"] for p in data.generate(200, seed=0)]
    return models.build_tokenizer("char", corpus)


def test_encode_pairs_masks_prompt_and_shifts(tok):
    qs, ys = ["What is 2 + 3?", "A rope is 9 meters long."], ["2 + 3 = <<2+3=5>>5\n#### 5", "#### 9"]
    enc = batching.encode_pairs(tok, qs, ys)
    for b, (q, y) in enumerate(zip(qs, ys)):
        ids, lab = enc["input_ids"][b].tolist(), enc["labels"][b].tolist()
        n_prompt = len(tok(data.format_prompt(q), add_special_tokens=False).input_ids)
        kept = [t for t in range(len(lab)) if lab[t] != -100]
        assert kept == list(range(n_prompt - 1, n_prompt - 1 + len(y) + 1))  # char-level: |y| + EOS targets
        assert all(lab[t] == ids[t + 1] for t in kept[:-1])  # shifted: position t predicts token t+1
        assert tok.decode([lab[t] for t in kept[:-1]]) == y and lab[kept[-1]] == tok.eos_token_id
        assert enc["n_tokens"][b] == len(y) + 1
        assert (enc["input_ids"][b, n_prompt + len(y) + 1:] == tok.pad_token_id).all()  # the rest is right padding
        assert ids[:n_prompt + len(y) + 1] == tok(data.format_prompt(q) + y, add_special_tokens=False).input_ids + \
            [tok.eos_token_id]


def _per_step_batch(tok, examples):
    """The batch the loop built before ids were cached: tokenize each (prompt, path) pair at the step,
    pad on the right by hand, labels = the next token over the path and its EOS (an independent build)."""
    rows = []
    for e in examples:
        p = tok(data.format_prompt(e["question"]), add_special_tokens=False).input_ids
        a = tok(e["answer"], add_special_tokens=False).input_ids + [tok.eos_token_id]
        ids = p + a
        rows.append((ids, [ids[t + 1] if t >= len(p) - 1 and t + 1 < len(ids) else -100 for t in range(len(ids))]))
    T = max(len(i) for i, _ in rows)
    return (torch.tensor([i + [tok.pad_token_id] * (T - len(i)) for i, _ in rows]),
            torch.tensor([l + [-100] * (T - len(l)) for _, l in rows]))


@pytest.mark.parametrize("kind,max_len", [("char", None), ("char", 260), ("bpe", None)])
def test_batches_from_cached_ids_equal_per_step_tokenization(kind, max_len):
    corpus = [data.format_prompt(p["question"]) + p["answer"] for p in data.generate(200, seed=0)]
    tok = models.build_tokenizer(kind, corpus, 300 if kind == "bpe" else None)
    examples = data.generate(40, seed=7, steps=(2, 4))
    cached = batching.TokenizedSet(tok, examples, max_len)
    n_tok = [len(tok(data.format_prompt(e["question"]) + e["answer"], add_special_tokens=False).input_ids) + 1
             for e in examples]  # char-level: prompt and path do not merge
    kept = [e for e, n in zip(examples, n_tok) if max_len is None or n <= max_len]
    assert cached.dropped == len(examples) - len(kept) and (max_len is None or 0 < cached.dropped < 40)
    batches = cached.batches(8, random.Random(0))
    for _ in range(12):  # more than one pass
        idx = next(batches)
        enc = cached.batch(idx)
        ids, lab = _per_step_batch(tok, [kept[i] for i in idx])  # whole rows: nothing is ever cut
        assert torch.equal(enc["input_ids"], ids) and torch.equal(enc["labels"], lab)
        assert torch.equal(enc["n_tokens"], (lab != -100).sum(1))
        T = lab.shape[1]  # the head's token indices, found on the host: every labelled position, in order
        assert enc["tok"].tolist() == [b * T + t for b in range(len(idx)) for t in range(T) if lab[b, t] != -100]


def test_length_buckets_see_every_row_once_per_pass_with_little_padding(tok):
    examples = data.generate(64 * 16, seed=3, steps=(2, 5))
    cached = batching.TokenizedSet(tok, examples)
    stream = cached.batches(64, random.Random(1))
    first_pass = [next(stream) for _ in range(16)]  # 16 batches of 64 = one pass (one group of 16 batches)
    assert all(len(b) == 64 for b in first_pass)
    assert sorted(i for b in first_pass for i in b) == list(range(len(examples)))
    fill = lambda batch: sum(cached.lengths[i] for i in batch) / (len(batch) * max(cached.lengths[i] for i in batch))
    rng = random.Random(1)
    random_batches = [rng.sample(range(len(examples)), 64) for _ in range(16)]
    bucketed, uniform = sum(map(fill, first_pass)) / 16, sum(map(fill, random_batches)) / 16
    assert bucketed > 0.95 and uniform < 0.85  # real tokens per padded slot: bucketing removes most padding
    assert batching.TokenizedSet(tok, examples[:5]).batches(64, random.Random(0)).__next__() != []  # fewer rows than a batch


def test_dard_loss_hand_computed():
    sig = lambda x: 1 / (1 + math.exp(-x))
    t = lambda *v: torch.tensor(v, dtype=torch.float64)
    # h = 0.1 * ((-10 + 11) - (-12 + 11)) = 0.2;  alpha term = 0.1 * 10 / 5 = 0.2
    loss, diag = distill.dard_loss(t(-10.0), t(-12.0), t(-11.0), t(-11.0), t(0.7), 0.1, 0.1, t(5.0))
    want = -(0.7 * math.log(sig(0.2)) + 0.3 * math.log(sig(-0.2))) + 0.2
    assert loss.item() == pytest.approx(want, abs=1e-12)
    assert diag["h"].item() == pytest.approx(0.2) and diag["reward_pos"].item() == pytest.approx(0.1)
    # q = 1 reduces to DPO's -log sigma(h); alpha = 0 drops the NLL term
    loss, _ = distill.dard_loss(t(-10.0), t(-12.0), t(-11.0), t(-11.0), t(1.0), 0.1, 0.0, t(5.0))
    assert loss.item() == pytest.approx(-math.log(sig(0.2)), abs=1e-12)


def test_teacher_targets_hand_computed():
    # margins per character: (-10/20 - -30/30) / 0.1 = 5;  equal per-char scores give 0
    lp_pos, lp_neg = torch.tensor([-10.0, -10.0, -10.0, -6.0]), torch.tensor([-30.0, -30.0, -30.0, -6.0])
    c_pos, c_neg = torch.tensor([20.0, 20, 20, 12]), torch.tensor([30.0, 30, 30, 12])
    correct_pos, correct_neg = torch.tensor([1, 1, 0, 0]), torch.tensor([1, 0, 1, 0])
    q = distill.teacher_targets(lp_pos, lp_neg, c_pos, c_neg, correct_pos, correct_neg, tau=0.1)
    torch.testing.assert_close(q, torch.tensor([1 / (1 + math.exp(-5)), 1.0, 0.0, 0.5]))


def test_fused_dard_matches_dard_loss_composed_with_seq_logprob():
    torch.manual_seed(0)
    B, T, d, V = 3, 7, 12, 37
    h = torch.randn(2 * B, T, d, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, d, dtype=torch.float64, requires_grad=True)
    lab = torch.randint(0, V, (2 * B, T))
    lab[:, :2] = -100  # prompt
    ref = -torch.rand(2 * B, dtype=torch.float64) * 20
    q = torch.rand(B, dtype=torch.float64)
    alpha = torch.tensor([0.1, 0.0, 0.1], dtype=torch.float64)
    loss, logps = kernels.dard_loss_fused(h, w, lab, ref, q, 0.1, alpha)
    gh, gw = torch.autograd.grad(loss, (h, w))
    lp = kernels.seq_logprob(h, w, lab)
    want, _ = distill.dard_loss(lp[:B], lp[B:], ref[:B], ref[B:], q, 0.1, alpha, (lab[:B] != -100).sum(1))
    wh, ww = torch.autograd.grad(want.mean(), (h, w))
    torch.testing.assert_close(loss, want.mean())
    torch.testing.assert_close(logps, lp.detach())
    torch.testing.assert_close(gh, wh)
    torch.testing.assert_close(gw, ww)


def _pairs(n, seed):
    rng = random.Random(seed)
    out = []
    for p in data.generate(n, seed=seed, steps=(2, 2), max_value=20):
        wrong = p["answer"].rsplit("####", 1)[0] + f"#### {rng.randint(100, 999)}"
        out.append(dict(question=p["question"], y_pos=p["answer"], y_neg=wrong, q=0.9, correct_pos=True))
    return out


def _train_dard(tok, samples, steps, backend, monkeypatch, device):
    monkeypatch.setenv("LADA_KERNEL", backend)
    model = models.build_model(tokenizer=tok, seed=3, **models.ZOO["llama-tiny"]).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    cfg = dict(beta=0.1, alpha=0.1, lam=0.0, distill_batch=len(samples), distill_epochs=1, max_len=None)
    enc = batching.encode_pairs(tok, [s["question"] for s in samples] * 2,
                               [s["y_pos"] for s in samples] + [s["y_neg"] for s in samples], device=device)
    ref = distill.score_paths(model, tok, [s["question"] for s in samples] * 2,
                              [s["y_pos"] for s in samples] + [s["y_neg"] for s in samples], device=device)[0]
    q = torch.tensor([s["q"] for s in samples], device=device)
    losses = []
    for _ in range(steps):
        h, w = models.hidden_and_head(model, enc["input_ids"])
        losses.append(kernels.dard_loss_fused(h, w, enc["labels"], ref.to(device), q, cfg["beta"], cfg["alpha"])[0].item())
        distill.distill(model, tok, opt, samples, [], "dard", cfg, random.Random(0), device=device)
    return losses


def test_tiny_model_lowers_dard_loss_through_both_paths(tok, monkeypatch):
    if not kernels.HAS_TRITON:
        pytest.skip("triton not installed")
    import os
    # Triton runs on CUDA tensors, or interpreted on CPU tensors (tests/conftest.py sets that without a GPU)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton path needs CUDA or TRITON_INTERPRET=1")
    samples = _pairs(3, seed=1)
    torch_losses = _train_dard(tok, samples, 4, "torch", monkeypatch, device)
    triton_losses = _train_dard(tok, samples, 4, "triton", monkeypatch, device)
    assert torch_losses[-1] < torch_losses[0] - 0.05  # training lowers the loss ...
    assert torch_losses == pytest.approx(triton_losses, rel=1e-4, abs=1e-5)  # ... identically through both paths


def test_distill_sft_and_identical_pairs(tok):
    model = models.build_model(tokenizer=tok, seed=0, **models.ZOO["llama-tiny"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    cfg = dict(beta=0.1, alpha=0.1, lam=0.5, distill_batch=4, distill_epochs=2, max_len=None)
    samples = _pairs(6, seed=2)
    local = data.generate(20, seed=3, steps=(2, 2), max_value=20)
    before = [p.detach().clone() for p in model.parameters()]
    st = distill.distill(model, tok, opt, samples, local, "sft", cfg, random.Random(0))
    assert st["steps"] == 4 and st["n"] == 6 and st["anchor"] > 0  # 2 epochs x ceil(6/4) batches, local anchor on
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    same = [dict(s, y_neg=s["y_pos"]) for s in samples]
    assert distill.distill(model, tok, opt, same, local, "dard", cfg, random.Random(0)) == {"steps": 0}
    with pytest.raises(ValueError, match="unknown loss"):
        distill.distill(model, tok, opt, samples, local, "kl", cfg, random.Random(0))


@pytest.mark.parametrize("loss", ["sft", "dard"])
def test_distill_lr_scale_scales_the_first_step(tok, loss):
    """AdamW without weight decay moves each weight by lr * m/(sqrt(v) + eps) on its first step, a
    quantity linear in lr: --distill_lr_scale 0.1 must move every weight a tenth as far, and leave the
    optimizer's lr as it found it (the local steps keep theirs)."""
    samples = _pairs(4, seed=5)
    cfg = dict(beta=0.1, alpha=0.1, lam=0.0, distill_batch=4, distill_epochs=1, max_len=None)
    moved = {}
    for scale in (1.0, 0.1):
        model = models.build_model(tokenizer=tok, seed=0, **models.ZOO["llama-tiny"])
        opt = distill.make_optimizer(model, 1e-3)
        before = [p.detach().clone() for p in model.parameters()]
        st = distill.distill(model, tok, opt, samples, [], loss, dict(cfg, distill_lr_scale=scale), random.Random(0))
        assert st["steps"] == 1 and opt.param_groups[0]["lr"] == 1e-3
        moved[scale] = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)])
    assert moved[1.0].abs().max() > 1e-4
    torch.testing.assert_close(moved[0.1], 0.1 * moved[1.0], rtol=1e-3, atol=1e-8)


def test_local_lr_scale_scales_the_local_step_and_protocol_passes_it(tok):
    """The same first-step argument for spec §2 step 1: --local_lr_scale 0.1 moves every weight a
    tenth as far, and the optimizer's lr is as it was after (distillation keeps its own).
    protocol.local_step, the loop's step 1, takes the scale from the config."""
    import types

    import protocol

    rows = [dict(question=s["question"], answer=s["y_pos"]) for s in _pairs(4, seed=6)]
    moved = {}
    for scale in (1.0, 0.1):
        model = models.build_model(tokenizer=tok, seed=0, **models.ZOO["llama-tiny"])
        opt = distill.make_optimizer(model, 1e-3)
        before = [p.detach().clone() for p in model.parameters()]
        party = types.SimpleNamespace(model=model, tok=tok, opt=opt, local=batching.as_tokenized(rows, tok))
        protocol.local_step(party, dict(local_steps=1, local_batch=4, device="cpu", local_lr_scale=scale),
                            random.Random(0))
        assert opt.param_groups[0]["lr"] == 1e-3
        moved[scale] = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)])
    assert moved[1.0].abs().max() > 1e-4
    torch.testing.assert_close(moved[0.1], 0.1 * moved[1.0], rtol=1e-3, atol=1e-8)


def test_pi_ref_is_the_student_as_distillation_starts(tok, monkeypatch, logp64):
    """DARD's pi_ref: log-probs of y+ and y- under the model exactly as distill() is called, frozen
    for every step after (docs/choices.md: departures from the spec)."""
    model = models.build_model(tokenizer=tok, seed=4, **models.ZOO["llama-tiny"])
    samples = _pairs(3, seed=4)
    logp = lambda q, y: logp64(model, tok, q, y)

    want = torch.tensor([logp(s["question"], s["y_pos"]) for s in samples] +  # float64
                        [logp(s["question"], s["y_neg"]) for s in samples], dtype=torch.float64)
    seen, real = [], distill.dard_loss_fused
    monkeypatch.setattr(distill, "dard_loss_fused", lambda h, w, lab, ref, *a, **kw: seen.append(ref.clone()) or real(h, w, lab, ref, *a, **kw))
    before = [p.detach().clone() for p in model.parameters()]
    cfg = dict(beta=0.1, alpha=0.1, lam=0.0, distill_batch=3, distill_epochs=3, max_len=None)
    distill.distill(model, tok, torch.optim.SGD(model.parameters(), lr=0.5), samples, [], "dard", cfg, random.Random(0))
    assert len(seen) == 3 and any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    for ref in seen:  # the same snapshot at every step (batch order is shuffled: compare as sets), though the model moved
        got = torch.sort(ref[:3]).values.double(), torch.sort(ref[3:]).values.double()
        torch.testing.assert_close(got[0], torch.sort(want[:3]).values, rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(got[1], torch.sort(want[3:]).values, rtol=1e-4, atol=1e-3)


def test_the_fused_head_gets_autocasts_dtype(tok, monkeypatch, logp64):
    """Under bf16 autocast the kernels get bf16 hidden states (the final norm returns the fp32
    residual stream) and give the log-probs of the model's own nn.Linear head under the same autocast,
    which runs in bf16; outside autocast they get fp32. Truth: logp64, the model's own logits in float64."""
    model = models.build_model(tokenizer=tok, seed=5, **models.ZOO["llama-tiny"])
    samples = _pairs(3, seed=5)
    enc = batching.encode_pairs(tok, [s["question"] for s in samples], [s["y_pos"] for s in samples])
    seen, real = [], distill.seq_logprob
    monkeypatch.setattr(distill, "seq_logprob", lambda h, w, lab, **kw: seen.append(h.dtype) or real(h, w, lab, **kw))
    truth = lambda: torch.tensor([logp64(model, tok, s["question"], s["y_pos"]) for s in samples], dtype=torch.float64)

    with torch.no_grad():
        fp32 = distill.sequence_logps(model, enc)
        torch.testing.assert_close(fp32.double(), truth(), rtol=1e-5, atol=1e-4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = distill.sequence_logps(model, enc)
            want = truth()  # the model's own head under autocast: bf16 logits
    assert seen == [torch.float32, torch.bfloat16]
    torch.testing.assert_close(bf16.double(), want, rtol=1e-5, atol=1e-3)
    assert not torch.allclose(bf16, fp32, rtol=0, atol=1e-3)  # bf16 products: not the fp32 path in disguise


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_a_training_step_never_waits_for_the_gpu(tok, backend, monkeypatch):
    """No host sync inside a warm-up / local / distillation step (the batch, the model, the head, the
    clipped AdamW step): torch's sync debug mode turns any sync into an error. The first step runs
    outside the check (lazy CUDA and optimizer initialization)."""
    monkeypatch.setenv("LADA_KERNEL", backend)
    model = models.build_model(tokenizer=tok, seed=0, **models.ZOO["llama-tiny"]).cuda()
    examples = batching.TokenizedSet(tok, data.generate(64, seed=4))
    opt = distill.make_optimizer(model, 1e-3)
    batches = examples.batches(16, random.Random(0))
    distill.optimizer_step(model, opt, distill.sft_loss(model, examples.batch(next(batches), "cuda")))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            distill.optimizer_step(model, opt, distill.sft_loss(model, examples.batch(next(batches), "cuda")))
    finally:
        torch.cuda.set_sync_debug_mode(0)


# -----------------------------------------------------------------------------
# DARD v2 (spec §4'): hand-computed values, the three pair kinds, the plug-in step

QS4 = ["Ava has 12 apples and buys 5 more. How many apples does Ava have now?",
       "A rope is 30 meters long. 8 meters are cut off. How many meters long is it now?",
       "Ben has $40. He spends $15. How many dollars does Ben have now?",
       "A farm has 9 chickens. Then 4 more arrive. How many are there now?"]
GOLD4 = ["12 + 5 = <<12+5=17>>17\n#### 17", "30 - 8 = <<30-8=22>>22\n#### 22", "40 - 15 = <<40-15=25>>25\n#### 25",
         "9 + 4 = <<9+4=13>>13\n#### 13"]
Q, A = QS4[0], GOLD4[0]
CORPUS = [data.format_prompt(q) + a for q, a in zip(QS4, GOLD4)] + ["0123456789"]

def test_dard_v2_pair_kinds():
    assert distill.dard_v2_pair(True, False) == "contrast"
    assert distill.dard_v2_pair(True, True) == "imitation"
    assert distill.dard_v2_pair(False, False) == "dropped" and distill.dard_v2_pair(False, True) == "dropped"


def test_dard_v2_loss_hand_computed_for_each_pair_kind():
    """Numbers worked by hand, β = 0.1, ε = 0.1, α = 1, y⁺ 4 tokens with log p −8 (NLL per token 2.0):
    contrast, h = 0 (both paths where π_ref had them): −[0.9·log ½ + 0.1·log ½] = log 2, plus 2.0;
    contrast, h = 0.1·((−8+10) − (−12+10)) = 0.4: −[0.9·log σ(0.4) + 0.1·log σ(−0.4)] = 0.9·0.513015 +
    0.1·0.913015 = 0.553015, plus 2.0; imitation (w = 0): 2.0 alone, whatever y⁻ does."""
    beta, eps, alpha = 0.1, 0.1, 1.0
    pi_pos = torch.tensor([-8.0, -8.0, -8.0], dtype=torch.float64)
    ref_pos = torch.tensor([-8.0, -10.0, -10.0], dtype=torch.float64)
    pi_neg = torch.tensor([-12.0, -12.0, -99.0], dtype=torch.float64)
    ref_neg = torch.tensor([-12.0, -10.0, -3.0], dtype=torch.float64)
    w = torch.tensor([1.0, 1.0, 0.0])
    losses, diag = distill.dard_v2_loss(pi_pos, pi_neg, ref_pos, ref_neg, w, beta, eps, alpha, torch.tensor([4, 4, 4]))
    assert losses.tolist() == pytest.approx([math.log(2) + 2.0, 0.553015 + 2.0, 2.0], abs=1e-6)
    assert diag["h"][:2].tolist() == pytest.approx([0.0, 0.4], abs=1e-12)
    # the finite optimum of the bounded contrast: its derivative in h, σ(h) − (1 − ε), vanishes at σ(h) = 0.9
    h = torch.tensor([math.log(9.0)], dtype=torch.float64, requires_grad=True)
    l_con = distill.dard_v2_loss(h / beta, torch.zeros(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64),
                                 torch.zeros(1, dtype=torch.float64), torch.ones(1), beta, eps, 0.0, torch.ones(1))[0]
    l_con.backward()
    assert h.grad.item() == pytest.approx(0.0, abs=1e-12)


def test_dard_v2_fused_batch_equals_the_hand_formula_on_its_log_probs(tok, monkeypatch):
    """One DARD v2 batch through the kernel path (distill._dard_v2_batch) on a tiny model: a contrast
    pair and an imitation pair; the loss equals the §4' formula evaluated by hand on float64 log-probs
    from the model's own logits (conftest.logp64), with π_ref given."""
    cfg_model, ctok = models.new_party("llama-tiny", ("char",), CORPUS, seed=3)
    pos = batching.encode(ctok, [Q, Q], [A, A])
    neg = batching.encode(ctok, [Q, Q], ["#### 7", "#### 9"])
    ref = torch.tensor([-30.0, -31.0, -40.0, 0.0])
    got = distill._dard_v2_batch(cfg_model, pos, neg, [1, 0], ref, 0.1, 0.1, 1.0, ctok.pad_token_id, "cpu").item()

    def lp(y):
        p = ctok(data.format_prompt(Q), add_special_tokens=False).input_ids
        a = ctok(y, add_special_tokens=False).input_ids + [ctok.eos_token_id]
        ids = torch.tensor([p + a])
        with torch.no_grad():
            logp = torch.log_softmax(cfg_model(input_ids=ids).logits.double()[0, :-1], -1)
        return sum(logp[t, ids[0, t + 1]].item() for t in range(len(p) - 1, len(p) + len(a) - 1)), len(a)
    (lp_a, n_a), (lp_7, _) = lp(A), lp("#### 7")
    h = 0.1 * ((lp_a + 30.0) - (lp_7 + 40.0))
    log_sig = lambda x: -math.log1p(math.exp(-x))  # noqa: E731
    contrast = -(0.9 * log_sig(h) + 0.1 * log_sig(-h))
    expected = (contrast + (-lp_a / n_a) + (-lp_a / n_a)) / 2  # pair 2: imitation only
    assert got == pytest.approx(expected, rel=1e-5)


def _plugin_cfg(**kw):
    return dict(dict(beta=0.1, eps=0.1, alpha=1.0, gamma=1.0, lam=0.0, distill_batch=2, distill_epochs=2, max_len=None,
                     distill_lr_scale=1.0), **kw)


def test_a_pair_with_a_wrong_sent_path_gets_no_gradient_and_a_reward_of_0(tok):
    """Spec §4': y⁺ wrong -> dropped. The host's SFT on H_k alone, and the host's SFT plus DARD v2 on
    a wrong-y⁺ pair, leave bit-identical weights (same seed); the pair is not among those trained on,
    but it is among those the filter hears of, with reward 0 (§3.3: a wrong path earns 0; see
    docs/study-v2.md, amendment A1). A correct pair in its place changes the weights."""
    def run(pairs):
        model, ctok = models.new_party("llama-tiny", ("char",), CORPUS, seed=3)
        opt = distill.make_optimizer(model, 1e-3)
        got = distill.distill_plugin(model, ctok, opt, [dict(question=Q, y_pos=A)] * 2, pairs, [], "dard2",
                                     _plugin_cfg(), random.Random(0))
        return got, torch.cat([p.detach().flatten() for p in model.parameters()])
    wrong = dict(question=Q, y_pos="#### 7", y_neg="#### 9", correct_pos=False, correct_neg=False)
    right = dict(question=Q, y_pos=A, y_neg="#### 9", correct_pos=True, correct_neg=False)
    host_only, w0 = run([])
    dropped, w1 = run([wrong])
    kept, w2 = run([right])
    assert torch.equal(w0, w1) and dropped["plugin"]["trained"] == [] and dropped["plugin"]["dropped"] == 1
    assert dropped["plugin"]["rewarded"] == [0]
    assert dropped["dard2"] == 0.0 and host_only["steps"] == dropped["steps"] == 2
    assert kept["plugin"]["trained"] == kept["plugin"]["rewarded"] == [0] and kept["plugin"]["contrast"] == 1
    assert not torch.equal(w0, w2)
    assert kept["plugin"]["dlogp_pos"] > 0  # y⁺ rose above π_ref (imitated and contrasted)


def test_client_learn_v2_rewards_only_pairs_dard_trained_on(monkeypatch):
    """protocol.client_learn under `lada`: H_k is fedmkt's rule, A_k ⊂ H_k; the filter hears of every
    pick of A_k, the wrong-y⁺ pair (dropped, not trained on) with reward exactly 0."""
    import protocol

    args = config.parse_args(["--smoke", "--method", "lada", "--scenario", "one2one"])
    cfg = dict(config.resolve_config(args), distill_epochs=1)
    public = [{"question": q, "answer": a} for q, a in zip(QS4, GOLD4)]
    model, ctok = models.new_party("gpt2-tiny", ("char",), CORPUS, seed=1)
    client = parties.Party("slm1", model, ctok, cfg, public, {"slm1": public}, public, {})
    y_llm = [GOLD4[0], "30 - 8 = 21\n#### 21", GOLD4[2], GOLD4[3]]   # right, wrong, right, right
    y_k = ["#### 16", "#### 1", GOLD4[2], "#### 12"]                 # wrong, wrong, right, wrong
    client.state = dict(round=1, y=y_k, lp_y=torch.full((4,), -30.0), n_y=torch.full((4,), 10),
                        lp_yllm=torch.full((4,), -40.0), n_yllm=torch.full((4,), 10), nll_gold=torch.full((4,), 2.0))
    offer = {"questions": QS4, "y_llm": y_llm, "logp_llm_yllm": torch.full((4,), -5.0),
             "nll_gold_llm": torch.tensor([1.0, 1.0, 1.0, 3.0])}  # fedmkt's H_k: where the LLM fits gold better: 0, 1, 2
    rewarded, real = [], protocol.reward_and_update
    monkeypatch.setattr(protocol, "reward_and_update", lambda *a: rewarded.append(list(a[4])) or real(*a))
    rewards, real_reward = [], protocol.learnability_reward
    monkeypatch.setattr(protocol, "learnability_reward", lambda *a: rewards.append(real_reward(*a)) or rewards[-1])
    monkeypatch.setattr(protocol, "plugin_pick", lambda kind, filt, feats, emb, host, *a: list(host))  # A_k = H_k
    got = protocol.client_learn(client, offer, {"logp_llm_yslm": torch.full((4,), -50.0)}, cfg, random.Random(0))
    assert got["plugin"]["H"] == 3 and got["plugin"]["A"] == 3 == got["selected"]
    assert (got["plugin"]["contrast"], got["plugin"]["imitation"], got["plugin"]["dropped"]) == (1, 1, 1)
    assert rewarded == [[0, 1, 2]] and rewards[0][1].item() == 0.0  # pair 1 (wrong y+): dropped, reward 0
