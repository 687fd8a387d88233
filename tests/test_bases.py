"""The shipped bases (models.BASES, made by `python bases/make.py`): a run starts from them instead of
warming up, --rewarm warms up as before, a damaged base is refused; and the committed bases are the
CPU preset's warm-ups of today: their names are the keys the preset computes, they load, a short
re-run of each warm-up reproduces its first recorded losses, and the shipped weights give the loss
recorded at the end of their warm-up."""
import importlib.util
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import config
import eval as ev
import models
import parties
import store
from batching import TokenizedSet
from distill import FIRST_LOSSES, sft_loss, warm_up

REPO = Path(__file__).resolve().parents[1]
SMOKE = ["--smoke", "--scenario", "one2one", "--device", "cpu", "--warm_llm", "8", "--warm_slm", "6", "--n_test", "2"]
# A short re-run matches the recorded first losses to this relative tolerance: float32 sums on the same
# machine kind and thread count are bit-equal; other CPUs and thread counts order the sums differently.
RERUN_RTOL = 1e-3
# The shipped weights' mean loss on the warm-up's last 20 batches, recomputed, against the mean of the
# 20 training losses recorded there: each of those was computed before its own update, so the final
# weights do no worse on them, and at a tenth of the peak lr only a little better (0.002-0.009 nats per
# token were seen); an untrained model of the same party is some nats worse.
TAIL_BAND = (-0.02, 0.0)  # recomputed - recorded, nats per token


def slm1_job(cache, *extra):
    cfg = config.resolve_config(config.parse_args(SMOKE + ["--cache", str(cache), *extra]))
    return parties.warm_jobs(cfg, parties.make_data(cfg, 1), only=["slm1"])["slm1"]


@pytest.fixture
def shipped(tmp_path, monkeypatch):
    """A bases folder of its own holding one base (slm1 of a smoke run, made by the project's warm-up)."""
    path, job = slm1_job(tmp_path / "made")
    model, _, info = parties.warm_party(path, *job)
    monkeypatch.setattr(models, "BASES", tmp_path / "bases")
    base = tmp_path / "bases" / path.name
    shutil.copytree(path, base)
    store.write_manifest(base)
    return base, model, info


def no_warm_up(*args, **kwargs):
    raise AssertionError("warmed up although a base was there")


def test_a_run_starts_from_the_shipped_base_not_a_warm_up(shipped, tmp_path, monkeypatch):
    base, model, info = shipped
    path, job = slm1_job(tmp_path / "fresh")
    assert path.name == base.name  # the same key: same preset, data, warm-up and seed
    monkeypatch.setattr(parties, "warm_up", no_warm_up)
    got, _, got_info = parties.warm_party(path, *job)
    assert got_info["base"] == base.name and got_info["warm_loss"] == info["warm_loss"]
    for (k, a), b in zip(model.state_dict().items(), got.state_dict().values()):
        assert torch.equal(a, b), k
    assert (path / "info.json").is_file()  # copied into the cache (the evaluation cache lives beside it)


def test_rewarm_warms_up_instead_and_keeps_what_a_warm_up_wrote(shipped, tmp_path, monkeypatch):
    base, _, _ = shipped
    calls = []
    monkeypatch.setattr(parties, "warm_up", lambda *a, **k: calls.append(1) or 0.5)
    path, job = slm1_job(tmp_path / "empty", "--rewarm")  # an empty cache: the base is not used
    assert parties.warm_party(path, *job)[2]["warm_loss"] == 0.5 and calls == [1]
    path, job = slm1_job(tmp_path / "copy")  # a cache holding the base's copy ...
    assert parties.warm_party(path, *job)[2]["base"] == base.name and calls == [1]
    path, job = slm1_job(tmp_path / "copy", "--rewarm")  # ... is warmed up again under --rewarm
    got = parties.warm_party(path, *job)[2]
    assert "base" not in got and got["warm_loss"] == 0.5 and calls == [1, 1]
    assert parties.warm_party(path, *job)[2]["cached"] and calls == [1, 1]  # a warm-up's entry is kept


def test_a_damaged_base_is_refused_naming_its_file(shipped, tmp_path, monkeypatch):
    base, _, _ = shipped
    raw = bytearray((base / "model.safetensors").read_bytes())
    raw[-1] ^= 1
    (base / "model.safetensors").write_bytes(bytes(raw))
    monkeypatch.setattr(parties, "warm_up", no_warm_up)
    path, job = slm1_job(tmp_path / "fresh")
    with pytest.raises(models.ModelError, match=r"model\.safetensors: its SHA-256 differs .*--rewarm"):
        parties.warm_party(path, *job)
    assert not path.exists()


# -----------------------------------------------------------------------------
# The committed bases

def make_module():
    spec = importlib.util.spec_from_file_location("make_bases", REPO / "bases" / "make.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(cfg, splits) of the run bases/make.py made them for."""
    cfg, _ = config.config_from_flags(make_module().FLAGS + ["--cache", str(tmp_path_factory.mktemp("cache"))])
    return cfg, parties.make_data(cfg, parties.n_clients(cfg))


@pytest.fixture(scope="module")
def committed(run):
    """{name: (shipped entry, warm_party's arguments)}."""
    return {name: (models.BASES / path.name, job) for name, (path, job) in parties.warm_jobs(*run).items()}


def test_the_committed_bases_are_the_cpu_presets_parties_today(committed):
    shipped = sorted(p.name for p in models.BASES.iterdir() if p.is_dir() and p.name != "__pycache__")
    assert shipped == sorted(entry.name for entry, _ in committed.values()), \
        "the shipped bases are not the CPU preset's warm-ups of today: run `python bases/make.py`"
    for name, (entry, job) in committed.items():
        models.check_base(entry)
        model, tok, info = models.load_cached_party(entry)
        assert info["params"] == models.n_params(model) and info["vocab"] == len(tok) == model.config.vocab_size
        assert info["zoo"] == job[1] and info["tokenizer"] == list(job[2])
        assert info["made"]["threads"] >= 1 and len(info["first_losses"]) == FIRST_LOSSES


def test_a_short_rerun_reproduces_each_bases_first_losses(committed):
    for name, (entry, (_, zoo, tok_spec, corpus, warm_data, warm, seed, dev, _)) in committed.items():
        recorded = models.load_cached_party(entry)[2]["first_losses"]
        model, tok = models.new_party(zoo, tok_spec, corpus, seed)
        first = []
        warm_up(model, tok, warm_data, seed=seed, device="cpu", first=first, stop=FIRST_LOSSES, **warm)
        np.testing.assert_allclose(first, recorded, rtol=RERUN_RTOL, err_msg=name)


def tail_loss(model, tok, warm_data, warm, seed, name) -> float:
    """The model's mean loss on the last 20 batches of the warm-up (its batch order replayed)."""
    data = TokenizedSet(tok, warm_data, warm["max_len"], name=name)
    batches = data.batches(warm["batch_size"], random.Random(seed))
    for _ in range(warm["steps"] - 20):
        next(batches)
    with torch.no_grad():
        return float(np.mean([float(sft_loss(model, data.batch(next(batches), "cpu"))) for _ in range(20)]))


def test_the_shipped_weights_give_the_loss_recorded_at_the_end_of_their_warm_up(committed):
    for name, (entry, (_, zoo, tok_spec, corpus, warm_data, warm, seed, _, _)) in committed.items():
        model, tok, info = models.load_cached_party(entry)
        got = tail_loss(model, tok, warm_data, warm, seed, name) - info["warm_loss"]
        assert TAIL_BAND[0] <= got <= TAIL_BAND[1], (name, got)
        untrained = models.new_party(zoo, tok_spec, corpus, seed)[0]  # the check can fail: before the warm-up
        assert tail_loss(untrained, tok, warm_data, warm, seed, name) - info["warm_loss"] > 1.0, name


def test_the_bases_leave_the_rounds_something_to_move(run, committed):
    """The CPU preset is a small testbed: from its bases the LLM sits well above every SLM (by 20
    points or more) and every SLM above 0 (2 problems or more), under checked grading, on the first
    100 problems of each party's own test set (the LLM: the public test set)."""
    cfg, splits = run
    acc = {}
    for name, (entry, _) in committed.items():
        model, tok, _ = models.load_cached_party(entry)
        examples = parties.eval_sets(cfg, splits, name)[name][:100]
        acc[name] = ev.evaluate(model, tok, examples, batch_size=100, max_new_tokens=cfg["max_new_tokens"])["checked"]
    slms = [acc[n] for n in acc if n != "llm"]
    assert cfg["grading"] == "checked" and len(slms) == 3
    assert acc["llm"] >= 0.5 and acc["llm"] - max(slms) >= 0.2 and min(slms) >= 0.02, acc


def test_diagnose_replays_the_first_steps_of_a_shipped_warm_up(run, committed, tmp_path, monkeypatch):
    """study/diagnose.py (what a GPU session runs to see where a warm-up's steps go) steps the run's own
    warm-up, not a shipped base: its first losses are those bases/make.py recorded."""
    from study import diagnose
    monkeypatch.setenv("LADA_KERNEL", "")  # diagnose sets it for the head it tests; the test gives it back
    cfg, splits = run
    losses, _, _, _, _ = diagnose.first_steps(dict(cfg, cache=str(tmp_path)), splits, "slm2", FIRST_LOSSES, "fp32", "")
    recorded = models.load_cached_party(committed["slm2"][0])[2]["first_losses"]
    np.testing.assert_allclose(losses, recorded, rtol=RERUN_RTOL)
