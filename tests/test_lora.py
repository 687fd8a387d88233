"""LoRA parties, π_ref without a copy, the memory plan against measured bytes, the frozen-head
kernel, and bad checkpoints: on the project's zoo models saved as Hugging Face directories."""
import copy
import importlib
import json
import random
import sys
from pathlib import Path

import pytest
import torch

import config
import parties
import batching
import distill
import federated
import kernels
import lora
import memory
import models
import protocol

from optional import need  # noqa: E402

need("peft")

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"
FAST = ["--smoke", "--pool_size", "4", "--n_val", "1", "--n_test", "2", "--max_new_tokens", "8", "--local_steps", "1"]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """(gsm8k data spec, LLM dir (llama), SLM dir (gpt2, char tokenizer)): untrained zoo models saved by models.py."""
    tmp = tmp_path_factory.mktemp("ckpts")
    rows = [json.loads(l) for l in (SHARED / "train.jsonl").read_text().splitlines()[:60]] if SHARED.is_dir() else \
        [{"question": f"What is {i} + 2?", "answer": f"{i} + 2 = <<{i}+2={i + 2}>>{i + 2}\n#### {i + 2}"} for i in range(60)]
    (tmp / "mini.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    corpus = [r["question"] + r["answer"] for r in rows]
    dirs = []
    for i, (zoo, kind) in enumerate([("llama-tiny", ("bpe", 300)), ("gpt2-tiny", ("char",))]):
        tok = models.build_tokenizer(kind[0], corpus, *kind[1:])
        models.save_model(models.build_model(tokenizer=tok, seed=i, **models.ZOO[zoo]), tok, tmp / f"m{i}")
        dirs.append(str(tmp / f"m{i}"))
    return f"gsm8k:{tmp / 'mini.jsonl'}", dirs[0], dirs[1], corpus


def lora_cfg(**kw):
    return dict(dict(lora=4, lora_alpha=8.0, lora_dropout=0.0, lora_targets="all-linear", lora_parties="all",
                     grad_ckpt=False, device="cpu", dtype="fp32"), **kw)


# -----------------------------------------------------------------------------
# Rounds with LoRA: only adapters move; resume with adapters = an uninterrupted run

def test_lora_rounds_train_only_adapters_and_resume_is_exact(tmp_path, ckpts, monkeypatch):
    data, llm, slm, _ = ckpts
    args = FAST + ["--llm", llm, "--slms", slm, "--data", data, "--lora", "4", "--lora_parties", "llm,slm1",
                   "--cache", str(tmp_path / "c")]
    built, real_build = [], parties.build_parties
    monkeypatch.setattr(parties, "build_parties", lambda cfg, splits: built.append(real_build(cfg, splits)) or built[-1])
    assert federated.main(args + ["--rounds", "2", "--out", str(tmp_path / "a")]) == 0
    full = json.loads((tmp_path / "a" / "results.json").read_text())
    for name, d in (("llm", llm), ("slm1", slm)):  # base weights as in the checkpoint file; every adapter moved
        party = built[0][name]
        base, _ = models.load_model(d)
        want = base.state_dict()
        n_lora = 0
        for k, p in party.model.named_parameters():
            if "lora_" in k:
                n_lora += 1
                assert p.requires_grad
                if "lora_B" in k:  # initialized to zero by peft, so any nonzero entry is training
                    assert p.abs().max() > 0, k
            else:
                assert not p.requires_grad
                key = k.replace("base_model.model.", "").replace(".base_layer", "")
                assert torch.equal(p, want[key]), k
        assert n_lora > 0 and full["parties"][name]["trainable"] < full["parties"][name]["params"] / 2
        assert (tmp_path / "a" / "ckpt" / name / lora.ADAPTER_FILE).is_file()
        assert not (tmp_path / "a" / "ckpt" / name / "model.safetensors").exists()  # adapters only

    assert federated.main(args + ["--rounds", "1", "--out", str(tmp_path / "b")]) == 0
    assert federated.main(args + ["--rounds", "2", "--out", str(tmp_path / "b"), "--resume"]) == 0
    resumed = json.loads((tmp_path / "b" / "results.json").read_text())
    for key in ("accuracy", "selected", "reward", "loss"):
        assert [r[key] for r in resumed["rounds"]] == [r[key] for r in full["rounds"]], key
    for name in ("llm", "slm1"):  # the adapters themselves, bit for bit
        from safetensors.torch import load_file
        a, b = (load_file(str(tmp_path / o / "ckpt" / name / lora.ADAPTER_FILE)) for o in ("a", "b"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_core_runs_without_peft_and_lora_without_it_is_one_line(tmp_path, ckpts, monkeypatch, capsys):
    data, llm, slm, _ = ckpts
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` now raises ImportError
    base = FAST + ["--llm", llm, "--slms", slm, "--data", data, "--rounds", "1", "--cache", str(tmp_path / "c")]
    assert federated.main(base + ["--out", str(tmp_path / "a")]) == 0  # no --lora: full fine-tuning, no peft needed
    capsys.readouterr()
    assert federated.main(base + ["--out", str(tmp_path / "b"), "--lora", "8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["federated.py: error: --lora needs peft: pip install -r requirements-lora.txt"]


# -----------------------------------------------------------------------------
# π_ref under LoRA: the model as distillation starts, not a copy

def test_pi_ref_equals_a_deep_copy_at_the_snapshot(ckpts, monkeypatch, logp64):
    _, llm, _, corpus = ckpts
    model, tok = models.load_model(llm)
    model = lora.prepare(model, lora_cfg(), "llm")
    opt = distill.make_optimizer(model, 3e-3)
    rows = [dict(question=f"What is {i} + 3?", answer=f"#### {i + 3}") for i in range(8)]
    distill.local_sft(model, tok, opt, rows, 5, 4, random.Random(0))  # adapters away from zero: snapshot != base
    snapshot = copy.deepcopy(model)  # the truth: an independent copy of the model as distill() is called
    samples = [dict(question=f"What is {i} + 3?", y_pos=f"{i} + 3 = {i + 3}\n#### {i + 3}", y_neg=f"#### {i}",
                    q=0.7, correct_pos=True) for i in range(4)]
    seen = []
    real = distill.dard_loss_fused

    def spy(hidden, weight, labels, ref, *a, **k):
        assert not weight.requires_grad  # the head is frozen under LoRA
        seen.append(ref.clone())
        return real(hidden, weight, labels, ref, *a, **k)

    monkeypatch.setattr(distill, "dard_loss_fused", spy)
    cfg = dict(beta=0.1, alpha=0.1, lam=0.0, distill_batch=4, distill_epochs=2)
    distill.distill(model, tok, opt, samples, [], "dard", cfg, random.Random(0))
    halves = lambda t: torch.cat([t[:4].sort().values, t[4:].sort().values]).double()  # batches come shuffled
    assert len(seen) == 2 and torch.equal(halves(seen[0]), halves(seen[1]))  # scored once, before the first step
    truth = torch.tensor([logp64(snapshot, tok, s["question"], s[y]) for y in ("y_pos", "y_neg") for s in samples])
    torch.testing.assert_close(halves(seen[0]), halves(truth), atol=1e-4, rtol=1e-5)
    with snapshot.disable_adapter():  # the snapshot is the adapted model, not the base
        base = [logp64(snapshot, tok, s["question"], s["y_pos"]) for s in samples]
    assert max(abs(a - b) for a, b in zip(base, truth[:4].tolist())) > 1e-3
    after = [logp64(model, tok, s["question"], s["y_pos"]) for s in samples]  # and training moved on from it
    assert max(abs(a - b) for a, b in zip(after, truth[:4].tolist())) > 1e-3


def test_grad_ckpt_gives_the_same_gradients(ckpts):
    _, llm, _, _ = ckpts
    rows = [dict(question=f"What is {i} + 3?", answer=f"{i} + 3 = {i + 3}\n#### {i + 3}") for i in range(6)]
    grads = []
    for ckpt in (False, True):
        model, tok = models.load_model(llm)
        torch.manual_seed(0)
        model = lora.prepare(model, lora_cfg(grad_ckpt=ckpt), "llm").train()
        assert model.get_base_model().is_gradient_checkpointing == ckpt
        loss = distill.sft_loss(model, batching.TokenizedSet(tok, rows).batch(range(6)))
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)
    assert grads[0].abs().sum() > 0


# -----------------------------------------------------------------------------
# The memory plan against measured bytes (CPU, fp32)

def saved_bytes(model, enc):
    """Bytes of the tensors autograd saves for backward in one training forward (storages counted
    once, parameters excluded): the activations the plan predicts."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = distill.sequence_logps(model, enc).sum()
    return sum(seen.values()), loss


@pytest.mark.parametrize("which,use_lora,dropout", [("llm", False, 0.0), ("llm", True, 0.1), ("slm", False, 0.0),
                                                    ("slm", True, 0.0)])
def test_memory_plan_matches_measured_bytes(ckpts, which, use_lora, dropout):
    _, llm, slm, _ = ckpts
    path = llm if which == "llm" else slm
    cfg = dict(config.BASE, **lora_cfg(lora=4 if use_lora else 0, lora_dropout=dropout),
               distill_batch=3, local_batch=4, lam=0.5, max_len=48, eval_batch=8, llm=path)  # 2*3 + 4 = 10 rows
    model, tok = models.load_model(path)
    want = memory.party_plan(model, cfg, "llm")
    model = lora.prepare(model, cfg, "llm").train()
    params = list(model.parameters())
    assert want["weights"] == sum(p.numel() * p.element_size() for p in params)  # exactly
    assert want["trainable"] == sum(p.numel() for p in params if p.requires_grad)
    V = model.get_output_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, V, (10, 48), generator=g)
    enc = dict(input_ids=ids, labels=ids.roll(-1, 1))  # every position labeled: the plan's bound
    got, loss = saved_bytes(model, enc)
    assert abs(want["activations"] - got) <= memory.ACT_TOLERANCE * got, (want["activations"], got)
    opt = distill.make_optimizer(model, 1e-3)
    distill.optimizer_step(model, opt, loss)
    assert want["grads"] == sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
    state = [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]
    assert want["optimizer"] == sum(t.numel() * t.element_size() for t in state)  # exactly, steps included


def test_plan_that_does_not_fit_is_one_line(tmp_path, ckpts, capsys):
    data, llm, slm, _ = ckpts
    code = federated.main(FAST + ["--llm", llm, "--slms", slm, "--data", data, "--max_len", "3000000",
                                  "--out", str(tmp_path / "o"), "--cache", str(tmp_path / "c")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("federated.py: error: the memory plan needs") and "--max_len (now 3000000)" in err[0]


# -----------------------------------------------------------------------------
# The fused head with a frozen weight: gradient for hidden only, on both paths

@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_frozen_head_kernel_grads_hidden_only(backend, monkeypatch):
    if backend == "triton" and not kernels.HAS_TRITON:
        pytest.skip("no triton")
    monkeypatch.setenv("LADA_KERNEL", backend)
    sl_mod, dl_mod = importlib.import_module("kernels.seq_logprob"), importlib.import_module("kernels.dard_loss")
    calls, real_bwd = [], sl_mod.triton_token_bwd

    def spy(*a, **k):
        gh, gw = real_bwd(*a, **k)
        calls.append(gw)
        return gh, gw

    monkeypatch.setattr(sl_mod, "triton_token_bwd", spy)
    monkeypatch.setattr(dl_mod, "triton_token_bwd", spy)
    g = torch.Generator().manual_seed(3)
    B, T, d, V = 2, 7, 37, 173  # odd sizes: every block is partly masked
    hidden = torch.randn(2 * B, T, d, generator=g)
    weight = torch.randn(V, d, generator=g) * 0.3  # frozen: requires_grad False
    labels = torch.randint(0, V, (2 * B, T), generator=g)
    labels[:, :2] = -100
    labels[1, :] = -100
    ref, q = torch.randn(2 * B, generator=g), torch.rand(B, generator=g)
    up = torch.randn(2 * B, generator=g)  # grad_output != 1

    def truth(h64):
        lp = torch.log_softmax(h64 @ weight.double().T, -1)
        keep = labels != -100
        tok = torch.gather(lp, 2, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1) * keep
        return tok.sum(1), keep[:B].sum(1)

    for fn in ("seq", "dard"):
        h = hidden.clone().requires_grad_(True)
        h64 = hidden.double().requires_grad_(True)
        lp64, n64 = truth(h64)
        if fn == "seq":
            (kernels.seq_logprob(h, weight, labels) * up).sum().backward()
            (lp64 * up.double()).sum().backward()
        else:
            loss, _ = kernels.dard_loss_fused(h, weight, labels, ref, q, 0.3, 0.1)
            loss.backward()
            kernels.dard_loss_from_logps(lp64, ref.double(), q.double(), 0.3, 0.1, n64).backward()
        assert weight.grad is None
        torch.testing.assert_close(h.grad.double(), h64.grad, atol=2e-5, rtol=1e-4)
    if backend == "triton":  # the backward was asked for no weight gradient and computed none
        assert len(calls) == 2 and all(gw is None for gw in calls)
    else:
        assert calls == []


# -----------------------------------------------------------------------------
# Bad checkpoints: one line, exit 2

def test_bad_checkpoints_are_one_line(tmp_path, ckpts, capsys):
    from transformers import BertConfig

    data, llm, slm, corpus = ckpts
    enc = tmp_path / "bert"
    BertConfig(vocab_size=300, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
               architectures=["BertForMaskedLM"]).save_pretrained(enc)
    models.load_tokenizer(llm).save_pretrained(enc)
    no_eos = tmp_path / "no_eos"
    tok = models.build_tokenizer("bpe", corpus, 300)
    tok.eos_token = None
    models.save_model(models.build_model(tokenizer=models.build_tokenizer("bpe", corpus, 300), **models.ZOO["llama-tiny"]),
                      tok, no_eos)
    cases = [(["--llm", str(enc), "--slms", slm], "not a causal language model (config.json: architectures BertForMaskedLM"),
             (["--llm", llm, "--slms", str(no_eos)], "the tokenizer has no EOS token"),
             (["--llm", llm, "--slms", slm, "--lora", "4", "--lora_parties", "slm7"], "no party named slm7"),
             (["--llm", llm, "--slms", slm, "--lora", "4", "--lora_targets", "nope_proj"], "--lora_targets nope_proj")]
    for args, msg in cases:
        code = federated.main(FAST + args + ["--data", data, "--out", str(tmp_path / "o"), "--cache", str(tmp_path / "c")])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and msg in err[0], (args, err)


def test_fedavg_of_lora_parties_averages_adapters_only(ckpts):
    _, llm, _, _ = ckpts
    ms = {}
    for k, name in enumerate(("slm1", "slm2")):
        model, _ = models.load_model(llm)
        ms[name] = lora.prepare(model, lora_cfg(), name)
        with torch.no_grad():  # distinct adapters and distinct (frozen) bases
            for n, p in ms[name].named_parameters():
                p.add_(torch.full_like(p, 0.1 * (k + 1)) if "lora_" in n else torch.full_like(p, k))
    before = {name: {n: p.clone() for n, p in m.named_parameters()} for name, m in ms.items()}
    avg = protocol.average([protocol.shared_weights(ms[n]) for n in ("slm1", "slm2")])  # what play_round does
    for n in ("slm1", "slm2"):
        protocol.load_shared(ms[n], avg)
    for n, p in ms["slm1"].named_parameters():
        for name in ("slm1", "slm2"):
            q = dict(ms[name].named_parameters())[n]
            if "lora_" in n:
                torch.testing.assert_close(q, (before["slm1"][n] + before["slm2"][n]) / 2)
            else:
                assert torch.equal(q, before[name][n])
