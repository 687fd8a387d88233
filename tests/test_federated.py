"""federated.py end to end on the smoke preset: every scenario and method, resume, the protocol, errors."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import federated
import models

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "gsm8k"
FAST = ["--smoke", "--rounds", "1", "--pool_size", "8", "--n_test", "6", "--max_new_tokens", "40"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))  # warmed-up smoke models, shared by the tests here


def run(args, out, cache):
    code = federated.main(FAST + ["--out", str(out), "--cache", cache] + args)
    assert code == 0
    return json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("scenario,method", [("hetero", m) for m in federated.METHODS] +
                         [(s, "lada") for s in ("homo", "one2one", "llm2slm")])
def test_every_scenario_and_method_runs(tmp_path, cache, scenario, method, monkeypatch):
    fedavg_calls, real_fedavg = [], federated.fedavg

    def checked_fedavg(ms, names):
        before = [torch.cat([p.detach().flatten() for p in ms[n].parameters()]) for n in names]
        real_fedavg(ms, names)
        after = [torch.cat([p.detach().flatten() for p in ms[n].parameters()]) for n in names]
        assert not torch.equal(before[0], before[1])  # they differed (own data) ...
        torch.testing.assert_close(after[0], torch.stack(before).mean(0))  # ... and now hold the mean
        assert all(torch.equal(after[0], a) for a in after)
        fedavg_calls.append(list(names))

    monkeypatch.setattr(federated, "fedavg", checked_fedavg)
    res = run(["--scenario", scenario, "--method", method], tmp_path, cache)
    n_slm = {"one2one": 1}.get(scenario, 3)
    assert res["config"]["scenario"] == scenario and res["config"]["method"] == method
    assert [r["round"] for r in res["rounds"]] == [1]
    acc = res["rounds"][0]["accuracy"]
    assert set(acc) == {"llm"} | {f"slm{k + 1}" for k in range(n_slm)} and all(0 <= a <= 1 for a in acc.values())
    sel, nbytes = res["rounds"][0]["selected"], res["rounds"][0]["bytes"]
    if method == "local":
        assert sel == {} and "down" not in nbytes
    else:
        assert set(k.split("/")[0] for k in sel) == ({"down"} if scenario == "llm2slm" else {"down", "up"})
        assert nbytes["down"] > 0 and nbytes["up"] > 0
    if method in ("random", "lada", "lada-filter"):
        assert all(2 <= v <= 6 for v in sel.values())  # min_budget <= |A| <= budget
    if method == "lada-loss":
        assert all(v == 8 for v in sel.values())  # all of the pool
    if scenario == "homo":  # FedAvg ran once, after the local step, and the SLMs' weights were averaged
        assert fedavg_calls == [["slm1", "slm2", "slm3"]] and nbytes["up"] > 3 * 4 * 15000
    assert (tmp_path / "results.md").read_text().count("\n") == 4  # header, rule, round 0, round 1


def test_resume_gives_identical_numbers(tmp_path, cache, monkeypatch):
    args = ["--rounds", "2", "--method", "lada", "--filter_optimism", "0.6"]  # optimism: filters carry more state
    full = run(args, tmp_path / "full", cache)

    real = federated.write_report
    calls = []

    def interrupt_after_round_1(out, results):
        calls.append(1)
        real(out, results)
        raise KeyboardInterrupt

    monkeypatch.setattr(federated, "write_report", interrupt_after_round_1)
    assert federated.main(FAST + args + ["--out", str(tmp_path / "cut"), "--cache", cache]) == 130
    monkeypatch.setattr(federated, "write_report", real)
    part = json.loads((tmp_path / "cut" / "results.json").read_text())
    assert len(part["rounds"]) == 1 and len(calls) == 1
    # the same directory without --resume is refused, a different config is refused
    assert federated.main(FAST + args + ["--out", str(tmp_path / "cut"), "--cache", cache]) == 2
    assert federated.main(FAST + args + ["--out", str(tmp_path / "cut"), "--cache", cache, "--resume", "--beta", "0.3"]) == 2
    resumed = run(args + ["--resume"], tmp_path / "cut", cache)
    strip = lambda rs: [{k: v for k, v in r.items() if k != "seconds"} for r in rs]
    assert strip(resumed["rounds"]) == strip(full["rounds"])
    assert resumed["initial"] == full["initial"]
    for name in ("llm", "slm1", "slm2", "slm3"):
        a, _ = models.load_model(tmp_path / "full" / "ckpt" / name)
        b, _ = models.load_model(tmp_path / "cut" / "ckpt" / name)
        assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert len((tmp_path / "cut" / "log.jsonl").read_text().splitlines()) == 2


def test_only_public_questions_paths_and_two_scalars_cross(tmp_path, cache, monkeypatch):
    sent = []
    real = federated.send
    monkeypatch.setattr(federated, "send", lambda msg, kind, *a: sent.append((kind, msg)) or real(msg, kind, *a))
    res = run(["--method", "lada"], tmp_path, cache)
    splits = federated.make_data(res["config"], 3)
    public = {p["question"] for p in splits["public"]}
    private = [p["question"] for c in splits["clients"] for p in c["private"]] + \
              [p["answer"] for c in splits["clients"] for p in c["private"]]
    kinds = [k for k, _ in sent]
    assert kinds.count("pool") == 3 and kinds.count("client_paths") == 3 and kinds.count("llm_score") == 3
    for kind, msg in sent:
        texts = [s for v in msg.values() if isinstance(v, list) for s in v]
        scalars = {k: v for k, v in msg.items() if isinstance(v, torch.Tensor)}
        assert all(t not in private for t in texts)
        assert all(v.dim() == 1 and len(v) == 8 for v in scalars.values())  # one scalar per pooled sample
        if kind == "pool":
            assert set(msg["questions"]) <= public and set(scalars) == {"logp_llm_yllm"}
        if kind == "client_paths":  # the client's two scores: the teacher scalars the LLM learns with
            assert set(scalars) == {"logp_slm_yslm", "logp_slm_yllm"} and len(msg["y_slm"]) == 8
        if kind == "llm_score":
            assert set(scalars) == {"logp_llm_yslm"}
    with pytest.raises(RuntimeError, match="outside the protocol"):
        real({"questions": [], "private_data": []}, "pool", {}, "down")


def test_failing_client_is_skipped(tmp_path, cache, monkeypatch):
    real = federated.paths_and_scores

    def flaky(cfg, model, tok, questions, seed):
        if model is flaky.bad:
            raise RuntimeError("client crashed")
        return real(cfg, model, tok, questions, seed)

    real_build = federated.build_parties

    def build(cfg, splits):
        ms, ts, info = real_build(cfg, splits)
        flaky.bad = ms["slm2"]
        return ms, ts, info

    monkeypatch.setattr(federated, "paths_and_scores", flaky)
    monkeypatch.setattr(federated, "build_parties", build)
    res = run(["--method", "lada"], tmp_path, cache)
    r = res["rounds"][0]
    assert "client crashed" in r["errors"]["slm2"] and set(r["errors"]) == {"slm2"}
    assert "down/slm1" in r["selected"] and "down/slm3" in r["selected"] and "down/slm2" not in r["selected"]


def test_real_checkpoints_and_gsm8k_file(tmp_path, cache):
    rows = [json.loads(l) for l in (SHARED / "train.jsonl").read_text().splitlines()[:80]] if SHARED.is_dir() else \
        [{"question": f"What is {i} + 2?", "answer": f"{i} + 2 = <<{i}+2={i + 2}>>{i + 2}\n#### {i + 2}"} for i in range(80)]
    f = tmp_path / "mini.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows))
    corpus = [r["question"] + r["answer"] for r in rows]
    dirs = []
    for i, (zoo, kind) in enumerate([("llama-tiny", ("bpe", 300)), ("gpt2-tiny", ("char",)), ("qwen2-tiny", ("bpe", 280))]):
        tok = models.build_tokenizer(kind[0], corpus, *kind[1:])
        models.save_model(models.build_model(tokenizer=tok, **models.ZOO[zoo]), tok, tmp_path / f"m{i}")
        dirs.append(str(tmp_path / f"m{i}"))
    res = run(["--llm", dirs[0], "--slms", ",".join(dirs[1:]), "--data", f"gsm8k:{f}", "--n_val", "2", "--n_test", "4"],
              tmp_path / "out", cache)
    assert set(res["rounds"][0]["accuracy"]) == {"llm", "slm1", "slm2"}
    assert res["parties"]["slm1"]["path"] == dirs[1]


def cli(*args, cwd):
    p = subprocess.run([sys.executable, str(REPO / "federated.py"), *args], cwd=cwd, capture_output=True, text=True)
    return p.returncode, p.stderr.strip().splitlines()


def test_bad_input_is_one_line_without_traceback(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "#### 1"}\n{"question": 3}\n')
    notmodel = tmp_path / "empty_dir"
    notmodel.mkdir()
    cases = [(["--scenario", "nope"], "invalid choice: 'nope'"),
             (["--method", "fedavg"], "invalid choice: 'fedavg'"),
             (["--smoke", "--data", f"gsm8k:{tmp_path / 'missing.jsonl'}"], "missing.jsonl: no such file"),
             (["--smoke", "--data", f"gsm8k:{bad}"], "bad.jsonl:2: expected an object"),
             (["--smoke", "--llm", str(notmodel), "--slms", str(notmodel)], "not a model directory"),
             (["--smoke", "--filter_optimism", "1.5"], "--filter_optimism must be in [0, 1], got 1.5")]
    for args, msg in cases:
        code, err = cli(*args, "--out", str(tmp_path / "o"), cwd=tmp_path)
        assert code == 2 and len(err) == 1 and msg in err[0], (args, err)
        assert "Traceback" not in err[0]
