"""models.py: tokenizer round trips, the zoo, save/load, the fused-kernel accessor, warm-up."""
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

import data
import models

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"


@pytest.fixture(scope="module")
def corpus():
    return [data.format_prompt(p["question"]) + p["answer"] for p in data.generate(400, seed=0)]


@pytest.mark.parametrize("kind,vocab", [("char", None), ("bpe", 300), ("bpe", 600)])
def test_tokenizer_round_trip_and_reload(tmp_path, corpus, kind, vocab):
    tok = models.build_tokenizer(kind, corpus, vocab, path=tmp_path)
    again = AutoTokenizer.from_pretrained(str(tmp_path))
    held_out = [data.format_prompt(p["question"]) + p["answer"] for p in data.generate(50, seed=99)]
    for s in held_out:
        ids = tok(s, add_special_tokens=False).input_ids
        assert tok.decode(ids) == s
        assert again(s, add_special_tokens=False).input_ids == ids
    assert tok.pad_token_id != tok.eos_token_id and tok.eos_token == "<eos>"
    if kind == "char":
        assert len(tok(held_out[0], add_special_tokens=False).input_ids) == len(held_out[0])
    else:
        assert len(tok) == vocab
        assert tok.tokenize("1234") == ["1", "2", "3", "4"]  # digits one per token


@pytest.mark.skipif(not SHARED.is_dir(), reason="shared GSM8K data not beside the repo")
def test_bpe_round_trips_real_gsm8k(corpus):
    tok = models.build_tokenizer("bpe", corpus, 400)
    rows = [json.loads(l) for l in (SHARED / "test.jsonl").read_text().splitlines()[:300]]
    for r in rows:  # byte-level: exact even for characters never seen in training (’, €)
        for s in (r["question"], r["answer"]):
            assert tok.decode(tok(s, add_special_tokens=False).input_ids) == s


def test_zoo_spans_8x_and_all_families(corpus):
    tok = models.build_tokenizer("bpe", corpus, 512)
    n = {name: models.n_params(models.build_model(tokenizer=tok, **spec)) for name, spec in models.ZOO.items()
         if "tiny" not in name}
    assert n["llama-26m"] / n["llama-1m"] >= 8  # the default LLM vs the smallest default SLM
    assert n["llama-cpu-l"] / n["llama-cpu-s"] >= 5  # CPU sizes: a narrower span
    assert {s["arch"] for s in models.ZOO.values()} == {"llama", "qwen2", "gpt2"}


@pytest.mark.parametrize("name", ["llama-tiny", "qwen2-tiny", "gpt2-tiny"])
def test_save_load_and_hidden_head(tmp_path, corpus, name):
    tok = models.build_tokenizer("char", corpus)
    model = models.build_model(tokenizer=tok, seed=1, **models.ZOO[name]).eval()
    ids = torch.tensor([tok("Question: 12 + 5\n", add_special_tokens=False).input_ids])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        h, w = models.hidden_and_head(model, ids, mask)
    assert h.shape == (1, ids.shape[1], model.config.hidden_size) and w.shape == (len(tok), h.shape[-1])
    torch.testing.assert_close(h @ w.T, logits, rtol=1e-5, atol=1e-5)  # hidden is after the final norm
    models.save_model(model, tok, tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "model.safetensors").is_file()
    again, tok2 = models.load_model(tmp_path / "ckpt")
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids, attention_mask=mask).logits, logits)
    assert tok2("12 + 5", add_special_tokens=False).input_ids == tok("12 + 5", add_special_tokens=False).input_ids
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp dirs left behind


def test_gpt2_padding_check_is_skipped(tmp_path, corpus, monkeypatch):
    """GPT-2's forward warns (and on CUDA syncs) when a batch holds pads and no mask: right padding
    without a mask is deliberate here, so the project's GPT-2 parties, built or loaded, skip it."""
    from transformers import AutoModelForCausalLM
    from transformers import modeling_utils

    warned = []
    monkeypatch.setattr(modeling_utils.logger, "warning_once", lambda msg, *a, **k: warned.append(msg))
    tok = models.build_tokenizer("char", corpus)
    model = models.build_model(tokenizer=tok, seed=1, **models.ZOO["gpt2-tiny"]).eval()
    ids = torch.tensor([tok("12 + 5", add_special_tokens=False).input_ids + [tok.pad_token_id] * 3])
    raw = AutoModelForCausalLM.from_config(model.config).eval()  # the library's own model: it warns
    with torch.no_grad():
        raw(input_ids=ids)
        assert len(warned) == 1 and "attention_mask" in warned[0]
        model(input_ids=ids)
        models.hidden_and_head(model, ids)
        models.save_model(model, tok, tmp_path / "ckpt")
        models.load_model(tmp_path / "ckpt")[0](input_ids=ids)
    assert len(warned) == 1


def test_load_model_errors(tmp_path):
    with pytest.raises(models.ModelError, match="not a model directory"):
        models.load_model(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(models.ModelError, match="no model.safetensors"):
        models.load_model(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(models.ModelError, match="cannot load model"):
        models.load_model(tmp_path)


def test_warm_up_learns_and_the_cache_returns_it(tmp_path, corpus):
    import distill

    train = data.generate(200, seed=5, steps=(2, 2), max_value=30)
    warm = dict(steps=60, batch_size=16, lr=1e-2)
    path = models.party_cache_dir(tmp_path, "slm", "llama-tiny", ("char",), corpus, train, warm)
    assert models.load_cached_party(path) is None
    model, tok = models.new_party("llama-tiny", ("char",), corpus)
    first = distill.warm_up(models.build_model(tokenizer=tok, **models.ZOO["llama-tiny"]), tok, train, steps=1)
    loss = distill.warm_up(model, tok, train, **warm)
    assert loss < 0.75 * first  # 60 steps lower the per-token NLL well below the start
    models.save_model(model, tok, path, info=dict(warm_loss=loss))
    again, _, info = models.load_cached_party(path)
    assert info == dict(warm_loss=loss, cached=True)
    for a, b in zip(model.parameters(), again.parameters()):
        torch.testing.assert_close(a, b)
    other = models.party_cache_dir(tmp_path, "slm", "llama-tiny", ("char",), corpus, train, dict(warm, steps=61))
    assert other != path  # anything that changes the warm-up changes the key


def test_half_written_cache_entry_is_never_loaded(tmp_path, corpus):
    model, tok = models.new_party("llama-tiny", ("char",), corpus)
    path = tmp_path / "slm-x"
    models.save_model(model, tok, path)  # model files without info.json: a write cut short
    assert models.load_cached_party(path) is None


def test_memory_plans_a_gpu_run_on_a_machine_without_one(tmp_path, corpus, capsys, monkeypatch):
    """`python memory.py --llm DIR --slms DIR --device cuda` (docs/real-checkpoints.md) prints the plan from
    config.json alone where no GPU is (exit 0, saying it was not compared with a GPU's memory), while a
    run asking for a GPU that is not there is still refused in one line."""
    import federated
    import memory

    tok = models.build_tokenizer("char", corpus)
    model = models.build_model(tokenizer=tok, seed=0, **models.ZOO["llama-tiny"])
    models.save_model(model, tok, tmp_path / "m")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    flags = ["--llm", str(tmp_path / "m"), "--slms", str(tmp_path / "m"), "--device", "cuda"]
    assert memory.main(flags) == 0
    out = capsys.readouterr().out
    assert out.startswith("memory plan:") and "(no CUDA device here: the plan is not compared with cuda's memory)" in out
    llm = next(line.split() for line in out.splitlines() if line.startswith("llm "))
    assert llm[1] == f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M", llm  # the plan's parameter count
    assert federated.main(flags + ["--out", str(tmp_path / "o"), "--cache", str(tmp_path / "c")]) == 2
    assert capsys.readouterr().err.strip() == "federated.py: error: --device cuda asks for a GPU, but CUDA is not available here"
