"""federated.py end to end on the smoke preset: every scenario and method, resume, the protocol, errors."""
import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import config
import parties
import methods
import runs
import store
import messages
import federated
import models
import protocol

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


@pytest.mark.parametrize("scenario,method", [("hetero", m) for m in methods.METHODS if m != "fedavg"] +
                         [(s, "lada") for s in ("homo", "one2one", "llm2slm")] + [("homo", "local"), ("homo", "fedavg")])
def test_every_scenario_and_method_runs(tmp_path, cache, scenario, method, monkeypatch):
    fedavg_calls, loaded, real_average, real_load = [], [], protocol.average, protocol.load_shared

    def checked_average(sds):
        flat = [torch.cat([t.detach().flatten().float() for t in sd.values()]) for sd in sds]
        avg = real_average(sds)
        assert not torch.equal(flat[0], flat[1])  # they differed (own data) ...
        torch.testing.assert_close(torch.cat([t.flatten() for t in avg.values()]), torch.stack(flat).mean(0))  # ... the mean
        fedavg_calls.append(len(sds))
        return avg

    def checked_load(model, avg):  # each SLM takes the average in
        real_load(model, avg)
        loaded.append(torch.cat([p.detach().flatten() for p in model.parameters()]))

    step_losses, real_step = {}, protocol.local_step

    def recorded_step(party, cfg, rng):
        step_losses[party.name] = real_step(party, cfg, rng)
        return step_losses[party.name]

    monkeypatch.setattr(protocol, "average", checked_average)
    monkeypatch.setattr(protocol, "load_shared", checked_load)
    monkeypatch.setattr(protocol, "local_step", recorded_step)
    res = run(["--scenario", scenario, "--method", method], tmp_path, cache)
    n_slm = {"one2one": 1}.get(scenario, 3)
    assert res["config"]["scenario"] == scenario and res["config"]["method"] == method
    assert [r["round"] for r in res["rounds"]] == [1]
    acc = res["rounds"][0]["accuracy"]
    assert set(acc) == {"llm"} | {f"slm{k + 1}" for k in range(n_slm)} and all(0 <= a <= 1 for a in acc.values())
    sel, nbytes = res["rounds"][0]["selected"], res["rounds"][0]["bytes"]
    if method in ("local", "fedavg"):
        assert sel == {} and ("down" not in nbytes) == (method == "local")
    else:
        assert set(k.split("/")[0] for k in sel) == ({"down"} if scenario == "llm2slm" else {"down", "up"})
        assert nbytes["down"] > 0 and nbytes["up"] > 0
    losses = res["rounds"][0]["loss"]  # the local step's loss, not overwritten by the distillation's anchor
    assert {n: losses[f"local/{n}"] for n in step_losses} == pytest.approx(step_losses)
    if method not in ("local", "fedavg"):
        assert all(losses[f"anchor/{k[5:]}"] > 0 for k, v in sel.items() if k.startswith("down/") and v)
    if method in ("random", "lada-v1", "lada-v1-filter"):
        assert all(2 <= v <= 6 for v in sel.values())  # min_budget <= |A| <= budget
    if method == "lada-v1-loss":
        assert all(v == 8 for v in sel.values())  # all of the pool
    plugin = res["rounds"][0].get("plugin", {})
    if method in methods.PLUGIN:  # v2: A_k within the host's H_k, pairs by kind, in log.jsonl too
        assert set(plugin) == {k for k in sel} | ({"llm"} if scenario != "llm2slm" else set())
        for k, v in sel.items():
            d = plugin[k]
            assert d["A"] == v <= d["H"] <= 8 and d["contrast"] + d["imitation"] + d["dropped"] == v
            if method == "lada-nofilter":
                assert d["A"] == d["H"]
        logged = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[0])
        assert logged["plugin"] == plugin and "warnings" in logged
    else:
        assert plugin == {}
    if scenario == "homo" and method != "local":  # FedAvg ran once, after the local step, and averaged the SLMs
        assert fedavg_calls == [3] and len(loaded) == 3 and all(torch.equal(loaded[0], x) for x in loaded)
        assert nbytes["up"] > 3 * 4 * 15000
    else:  # `local` is local training alone, in homo too
        assert fedavg_calls == []
    assert (tmp_path / "results.md").read_text().count("\n") == 4  # header, rule, round 0, round 1


def test_initial_evaluation_is_kept_with_the_warmed_up_models(tmp_path, monkeypatch):
    """The round-0 scores of a cached warm-up are computed once and read by every later run that scores
    the same sets the same way (a grid's methods share their start); a change of what reaches
    generation scores again."""
    cache = str(tmp_path / "cache")
    calls, real = [], runs.evaluate

    def counted(cfg, party, rnd):
        calls.append((party.name, rnd))
        return real(cfg, party, rnd)

    monkeypatch.setattr(runs, "evaluate", counted)
    first = run(["--method", "local"], tmp_path / "a", cache)
    assert sum(r == 0 for _, r in calls) == 4  # the LLM and three SLMs, scored at round 0
    calls.clear()
    again = run(["--method", "lada"], tmp_path / "b", cache)
    assert [r for _, r in calls] == [1] * 4  # only the round's own scoring
    assert again["initial"] == first["initial"] and again["initial_correct"] == first["initial_correct"]
    calls.clear()
    run(["--method", "local", "--max_new_tokens", "30"], tmp_path / "c", cache)
    assert sum(r == 0 for _, r in calls) == 4


def test_resume_gives_identical_numbers(tmp_path, cache, monkeypatch):
    args = ["--rounds", "2", "--method", "lada", "--filter_optimism", "0.6"]  # optimism: filters carry more state
    full = run(args, tmp_path / "full", cache)

    real = runs.write_report
    calls = []

    def interrupt_after_round_1(out, results):
        calls.append(1)
        real(out, results)
        raise KeyboardInterrupt

    monkeypatch.setattr(runs, "write_report", interrupt_after_round_1)
    assert federated.main(FAST + args + ["--out", str(tmp_path / "cut"), "--cache", cache]) == 130
    monkeypatch.setattr(runs, "write_report", real)
    part = json.loads((tmp_path / "cut" / "results.json").read_text())
    assert len(part["rounds"]) == 1 and len(calls) == 1
    # the same directory without --resume is refused, a different config is refused
    assert federated.main(FAST + args + ["--out", str(tmp_path / "cut"), "--cache", cache]) == 2
    assert federated.main(FAST + args + ["--out", str(tmp_path / "cut"), "--cache", cache, "--resume", "--beta", "0.3"]) == 2
    assert federated.main(FAST + args + ["--out", str(tmp_path / "cut"), "--cache", cache, "--resume",
                                         "--distill_lr_scale", "0.5"]) == 2
    saved = tmp_path / "cut" / "ckpt" / "config.json"  # as written before --distill_lr_scale existed: at its default
    saved.write_text(json.dumps({k: v for k, v in json.loads(saved.read_text()).items() if k != "distill_lr_scale"}))
    store.write_manifest(saved.parent.resolve())  # that version's checkpoint: its own checksums
    resumed = run(args + ["--resume"], tmp_path / "cut", cache)
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("seconds", "phases")} for r in rs]
    assert strip(resumed["rounds"]) == strip(full["rounds"])
    assert resumed["initial"] == full["initial"]
    for name in ("llm", "slm1", "slm2", "slm3"):
        a, _ = models.load_model(tmp_path / "full" / "ckpt" / name)
        b, _ = models.load_model(tmp_path / "cut" / "ckpt" / name)
        assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert len((tmp_path / "cut" / "log.jsonl").read_text().splitlines()) == 2


@pytest.mark.parametrize("method", ["lada-v1", "lada"])
def test_only_public_questions_paths_and_two_scalars_cross(tmp_path, cache, monkeypatch, method):
    """v1 exchanges the paths and two log-probs per sample; v2 runs on its host fedmkt, which also sends
    each side's per-character NLL of the gold solution (spec §2 step 4): nothing else crosses."""
    sent = []
    real = messages.send
    monkeypatch.setattr(messages, "send", lambda msg, kind, *a: sent.append((kind, msg)) or real(msg, kind, *a))
    res = run(["--method", method], tmp_path, cache)
    gold = method == "lada"
    splits = parties.make_data(res["config"], 3)
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
            assert set(msg["questions"]) <= public and set(scalars) == {"logp_llm_yllm"} | ({"nll_gold_llm"} if gold else set())
        if kind == "client_paths":  # the client's two scores: the teacher scalars the LLM learns with
            assert set(scalars) == {"logp_slm_yslm", "logp_slm_yllm"} | ({"nll_gold_slm"} if gold else set())
            assert len(msg["y_slm"]) == 8
        if kind == "llm_score":
            assert set(scalars) == {"logp_llm_yslm"}
    with pytest.raises(RuntimeError, match="outside the protocol"):
        real({"questions": [], "private_data": []}, "pool", {}, "down")


def test_failing_client_is_skipped(tmp_path, cache, monkeypatch):
    real = protocol.paths_and_scores

    def flaky(cfg, party, questions, seed):
        if party.name == "slm2":
            raise RuntimeError("client crashed")
        return real(cfg, party, questions, seed)

    monkeypatch.setattr(protocol, "paths_and_scores", flaky)
    res = run(["--method", "lada"], tmp_path, cache)
    r = res["rounds"][0]
    assert "client crashed" in r["errors"]["slm2"] and set(r["errors"]) == {"slm2"}
    assert "down/slm1" in r["selected"] and "down/slm3" in r["selected"] and "down/slm2" not in r["selected"]
    assert "up/slm2" not in r["selected"] and "up/slm1" in r["selected"]


# -----------------------------------------------------------------------------
# The steps of spec §2 one by one, on hand-built messages

QS = ["Ava has 12 apples and buys 5 more. How many apples does Ava have now?",
      "A rope is 30 meters long. 8 meters are cut off. How many meters long is it now?",
      "Ben has $40. He spends $15. How many dollars does Ben have now?",
      "A farm has 9 chickens. Then 4 more arrive. How many are there now?"]
GOLD = ["12 + 5 = <<12+5=17>>17\n#### 17", "30 - 8 = <<30-8=22>>22\n#### 22", "40 - 15 = <<40-15=25>>25\n#### 25",
        "9 + 4 = <<9+4=13>>13\n#### 13"]


@pytest.fixture()
def hand_parties(tmp_path):
    """A server and one client built by hand (tiny random models, no warm-up), the smoke config."""
    args = config.parse_args(["--smoke", "--method", "lada-v1", "--scenario", "one2one"])
    cfg = dict(config.resolve_config(args), out=str(tmp_path), resume=False)
    public = [{"question": q, "answer": a} for q, a in zip(QS, GOLD)]
    corpus = [q + "\n" + a for q, a in zip(QS, GOLD)] * 3
    made = {}
    for name, zoo, kind in [("llm", "llama-tiny", ("bpe", 280)), ("slm1", "gpt2-tiny", ("char",))]:
        model, tok = models.new_party(zoo, kind, corpus, seed=1)
        made[name] = parties.Party(name, model, tok, cfg, public, {name: public}, public, {})
    return cfg, made["llm"], made["slm1"]


def test_client_answer_and_server_score_carry_the_right_scores(hand_parties, logp64):
    _independent_logp = lambda party, q, y: logp64(party.model, party.tok, q, y)  # float64 truth
    cfg, server, client = hand_parties
    offer = {"questions": QS, "y_llm": GOLD, "logp_llm_yllm": torch.zeros(4)}
    reply = protocol.client_answer(client, offer, cfg, rnd=1, k=0)
    assert set(reply) == messages.SCHEMA["client_paths"] - {"nll_gold_slm"} and len(reply["y_slm"]) == 4  # lada-v1: no gold NLL
    for i in range(4):
        assert reply["logp_slm_yllm"][i].item() == pytest.approx(_independent_logp(client, QS[i], GOLD[i]), rel=1e-4)
        assert reply["logp_slm_yslm"][i].item() == pytest.approx(
            _independent_logp(client, QS[i], reply["y_slm"][i]), rel=1e-4)
    server.state = dict(qs=QS, y=GOLD, lp_y=torch.zeros(4), n_y=torch.ones(4), c_y=torch.ones(4), clients={})
    hand = dict(reply, y_slm=["#### 17", "8 + 30 = 38\n#### 38", "#### 25", "no answer"])
    score = protocol.server_score(server, "slm1", hand, cfg)
    assert set(score) == messages.SCHEMA["llm_score"]
    for i in range(4):
        assert score["logp_llm_yslm"][i].item() == pytest.approx(_independent_logp(server, QS[i], hand["y_slm"][i]), rel=1e-4)
    assert server.state["clients"]["slm1"]["c_yk"].tolist() == [1.0, 0.0, 1.0, 0.0]  # checked against the gold


def test_client_learn_builds_the_spec_pairs_and_trains(hand_parties, monkeypatch):
    import distill

    cfg, server, client = hand_parties
    cfg = dict(cfg, method="lada-v1-loss")  # allocation "all": every pooled sample, so the pairs are known
    y_llm = [GOLD[0], "30 - 8 = 21\n#### 21", GOLD[2], "9 + 4 = 14\n#### 14"]  # right, wrong, right, wrong
    y_k = ["12 + 5 = 16\n#### 16", GOLD[1], GOLD[2], "#### 12"]          # wrong, right, same as y_llm, wrong
    client.state = dict(y=y_k, lp_y=torch.full((4,), -30.0), n_y=torch.full((4,), 10), lp_yllm=torch.full((4,), -40.0),
                        n_yllm=torch.full((4,), 10))
    offer = {"questions": QS, "y_llm": y_llm, "logp_llm_yllm": torch.tensor([-5.0, -5.0, -5.0, -5.0])}
    score = {"logp_llm_yslm": torch.tensor([-50.0, -50.0, -5.0, -5.0])}
    seen, rewarded = [], []
    real, real_reward = distill.distill, protocol.reward_and_update
    monkeypatch.setattr(protocol, "distill", lambda *a, **k: seen.append(a[3]) or real(*a, **k))
    monkeypatch.setattr(protocol, "reward_and_update", lambda *a: rewarded.append(list(a[4])) or real_reward(*a))
    before = [p.detach().clone() for p in client.model.parameters()]
    got = protocol.client_learn(client, offer, score, cfg, random.Random(0))
    pairs = seen[0]
    assert [p["y_pos"] for p in pairs] == y_llm and [p["y_neg"] for p in pairs] == y_k  # y+ = y_L, y- = y_k
    assert [p["correct_pos"] for p in pairs] == [True, False, True, False]
    # q (spec §4): 1 where only y+ is correct, 0 where only y- is, else sigma(teacher margin per char / tau)
    m = lambda i: (-5.0 / len(y_llm[i]) - score["logp_llm_yslm"][i].item() / len(y_k[i])) / cfg["tau"]
    assert pairs[0]["q"] == 1.0 and pairs[1]["q"] == 0.0
    assert pairs[3]["q"] == pytest.approx(1 / (1 + math.exp(-m(3))), rel=1e-5)
    assert got["selected"] == 4 and 0.0 <= got["reward"] <= 1.0 and got["losses"]["dard"] > 0
    assert rewarded == [[0, 1, 3]]  # pair 2 (y+ == y-) is dropped by DARD: no reward, no filter update
    assert any(not torch.equal(a, b) for a, b in zip(before, client.model.parameters()))


def test_server_pick_and_learn(hand_parties):
    cfg, server, client = hand_parties
    cfg = dict(cfg, method="random", budget=3)
    y_k = [GOLD[0], "#### 5", GOLD[2], "#### 7"]
    server.state = dict(qs=QS, y=["#### 1"] * 4, lp_y=torch.full((4,), -20.0), n_y=torch.full((4,), 5),
                        c_y=torch.zeros(4), clients={})
    reply = {"y_slm": y_k, "logp_slm_yslm": torch.full((4,), -10.0), "logp_slm_yllm": torch.full((4,), -30.0)}
    protocol.server_score(server, "slm1", reply, cfg)
    B = protocol.server_pick(server, "slm1", cfg, random.Random(0))
    assert len(B) == 3 and B == sorted(set(B)) and all(0 <= i < 4 for i in B)  # a random subset of `budget`
    before = [p.detach().clone() for p in server.model.parameters()]
    got = protocol.server_learn(server, cfg, random.Random(0))
    assert set(got["rewards"]) == {"slm1"} and 0.0 <= got["rewards"]["slm1"] <= 1.0
    assert got["losses"]["dard"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, server.model.parameters()))


# -----------------------------------------------------------------------------
# What runs where: the GPU sizes on a GPU, the CPU preset without one (and a line saying so)

@pytest.mark.parametrize("argv,gpu,preset,says", [
    ([], False, "cpu", "no GPU, so this runs --preset cpu"),
    (["--preset", "default"], False, "default", "warning: --preset default without a GPU"),
    ([], True, "default", None),
    (["--device", "cpu"], True, "cpu", "no GPU, so this runs --preset cpu"),
    (["--preset", "cpu"], False, "cpu", None),
    (["--smoke"], False, "smoke", None),
])
def test_preset_follows_the_machine(argv, gpu, preset, says):
    got, notice = config.choose_preset(config.parse_args(argv), gpu)
    assert got == preset
    assert (notice is None) if says is None else (says in notice and "\n" not in notice)


def test_no_gpu_default_command_says_what_it_runs(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    # a bad value stops the run right after the notice would be printed: one error line, no notice
    code, err = cli("--filter_optimism", "2", "--out", str(tmp_path / "o"), cwd=tmp_path)
    assert code == 2 and len(err) == 1 and "--filter_optimism" in err[0]
    p = subprocess.Popen([sys.executable, str(REPO / "federated.py"), "--out", str(tmp_path / "o2"), "--cache",
                          str(tmp_path / "c")], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = p.stderr.readline()  # the notice comes before any work
        printed = json.loads(p.stdout.readline())
    finally:
        p.kill()
        p.wait()
    assert first.startswith("federated.py: no GPU, so this runs --preset cpu (about")
    assert printed["parties"] == "cpu" and printed["rounds"] == config.PRESETS["cpu"]["rounds"]
    assert printed["out"].endswith("o2") and printed["dtype"] == "fp32"


@pytest.mark.parametrize("argv, dtype", [
    (["--device", "cpu"], "fp32"),
    (["--device", "cuda"], "fp32"),  # the built-in parties: fp32 + TF32 (bf16 learned far less on an H200)
    (["--device", "cuda", "--llm", "a", "--slms", "b,c"], "bf16"),  # real checkpoints: bf16 autocast
    (["--device", "cuda", "--dtype", "bf16"], "bf16"),
    (["--device", "cuda", "--llm", "a", "--slms", "b", "--dtype", "fp32"], "fp32"),
])
def test_dtype_auto_is_bf16_only_for_real_checkpoints_on_cuda(argv, dtype, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # resolving the flags touches no GPU
    args = config.parse_args(argv + ["--preset", "cpu"])
    assert config.resolve_config(args)["dtype"] == dtype


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
             (["--smoke", "--method", "fedavg"], "--method fedavg needs --scenario homo"),
             (["--method", "fedprox"], "invalid choice: 'fedprox'"),
             (["--smoke", "--data", f"gsm8k:{tmp_path / 'missing.jsonl'}"], "missing.jsonl: no such file"),
             (["--smoke", "--data", f"gsm8k:{bad}"], "bad.jsonl:2: expected an object"),
             (["--smoke", "--llm", str(notmodel), "--slms", str(notmodel)], "not a model directory"),
             (["--smoke", "--filter_optimism", "1.5"], "--filter_optimism must be in [0, 1], got 1.5")]
    for args, msg in cases:
        code, err = cli(*args, "--out", str(tmp_path / "o"), cwd=tmp_path)
        assert code == 2 and len(err) == 1 and msg in err[0], (args, err)
        assert "Traceback" not in err[0]


# -----------------------------------------------------------------------------
# The testbed's pieces: knowledge split, per-problem results, the oracle, random at the filter's counts

def test_testbed_run_reports_private_domain_and_per_problem_results(tmp_path, cache):
    res = run(["--rounds", "2", "--method", "oracle", "--private_only", "time", "--eval_subset", "3", "--n_test", "7"],
              tmp_path, cache)
    first, last = res["rounds"]
    assert set(res["initial_correct"]) == {"llm", "llm-private", "slm1", "slm2", "slm3"}
    assert all(n == 3 for n in first["eval_n"].values()) and first["correct"] == {}  # a round before the last: subset
    assert all(n == 7 for n in last["eval_n"].values())
    for bits, acc in [(res["initial_correct"], res["initial"]), (last["correct"], last["accuracy"])]:
        assert all(len(b) == 7 and set(b) <= {"0", "1"} and acc[p] == b.count("1") / 7 for p, b in bits.items())
    splits = parties.make_data(res["config"], 3)
    assert {p["domain"] for p in splits["public_test_private"]} == {"time"}
    val = run(["--rounds", "1", "--method", "local", "--private_only", "time", "--eval_split", "val"],
              tmp_path / "val", cache)  # tuning reads the validation sets only
    assert val["rounds"][0]["eval_n"] == {"llm": 10, "llm-private": 10, "slm1": 10, "slm2": 10, "slm3": 10}
    assert not {p["domain"] for p in splits["general"]} & {"time"}


def test_oracle_takes_every_correct_teacher_path(hand_parties):
    cfg, _, _ = hand_parties
    feats = torch.zeros(5, 3)
    got = protocol.allocate("oracle", None, feats, None, None, None, torch.tensor([1.0, 0, 1, 1, 0]), cfg, random.Random(0))
    assert got == [0, 2, 3]
    got = protocol.allocate("random", None, feats, None, None, None, None, cfg, random.Random(0), count=2)
    assert len(got) == 2 and len(set(got)) == 2


def test_random_matches_the_counts_of_a_filter_run(tmp_path, cache):
    lada = run(["--rounds", "2", "--method", "lada-v1"], tmp_path / "lada", cache)
    rnd = run(["--rounds", "2", "--method", "random", "--counts_from", str(tmp_path / "lada" / "results.json")],
              tmp_path / "random", cache)
    assert [r["selected"] for r in rnd["rounds"]] == [r["selected"] for r in lada["rounds"]]
    plain = run(["--rounds", "2", "--method", "random"], tmp_path / "plain", cache)
    assert all(v == 6 for r in plain["rounds"] for v in r["selected"].values())  # without it: budget
    assert federated.main(FAST + ["--out", str(tmp_path / "x"), "--cache", cache, "--method", "lada",
                                  "--counts_from", str(tmp_path / "lada" / "results.json")]) == 2


def test_correctness_follows_grading():
    """--grading decides which paths the loop counts as correct (filters' rewards, DARD's q, the oracle)."""
    from types import SimpleNamespace

    paths = ["After removing, 111 - 5 = <<1-7=8>>8 meters.\n#### 6",  # garbled, last number right by chance
             "After removing, 11 - 5 = <<11-5=6>>6 meters.\n#### 6", "#### 5", "so 6"]
    for grading, want in [("flexible", [1, 1, 0, 1]), ("strict", [1, 1, 0, 0]), ("checked", [0, 1, 0, 0])]:
        party = SimpleNamespace(gold={"q": "... #### 6"}, grading=grading)
        assert protocol.correctness(party, ["q"] * 4, paths).tolist() == want


def test_slm_pretrain_adds_shared_domain_problems_to_each_slm_warm_up(tmp_path, monkeypatch):
    """--slm_pretrain N: each generated SLM warms up on N solved problems of the LLM-only general set
    (shared domains, in no pool, validation or test set) followed by its private data; 0 = private alone."""

    seen = {}
    monkeypatch.setattr(parties, "warm_up", lambda model, tok, examples, **kw: seen.setdefault(kw["desc"], examples) and 0.0)
    for n in (0, 7):
        seen.clear()
        cfg = config.resolve_config(config.parse_args(
            ["--smoke", "--device", "cpu", "--private_only", "time", "--slm_pretrain", str(n), "--cache", str(tmp_path / f"c{n}")]))
        splits = parties.make_data(cfg, 3)
        parties.build_parties(cfg, splits, only=["slm1", "slm2", "slm3"])
        general = {p["question"] for p in splits["general"]}
        held_out = {p["question"] for k in ("public", "public_test", "public_val") for p in splits[k]}
        for k in range(3):
            got = seen[f"warm-up slm{k + 1}"]
            assert got[n:] == splits["clients"][k]["private"]
            assert len(got[:n]) == n and {p["question"] for p in got[:n]} <= general
            assert not {p["question"] for p in got[:n]} & held_out and all(p["domain"] != "time" for p in got[:n])


def test_solutions_longer_than_the_generation_budget_are_counted_and_said(capsys):
    """A character tokenizer makes one token per character: a 30-character solution needs 31 tokens
    with EOS, over a budget of 20; a 6-character one fits. Answer-only pool entries are not solutions."""
    long, short = "Now there is 5 + 3 = 8.\n#### 8", "#### 8"
    tok = models.build_tokenizer("char", [long + "Q?"])
    evals = {"slm1": [{"answer": long}, {"answer": short}, {"answer": long}]}
    public = [{"answer": long}, {"answer": "#### 9", "answer_only": True}, {"answer": short}]
    got = parties.over_max_new_tokens("slm1", tok, evals, public, max_new_tokens=20)
    assert len(long) == 30 and got == {"slm1": 2, "pool": 1}
    out = capsys.readouterr().out
    assert "slm1: 2 of 3 solutions of its slm1 set need more than --max_new_tokens 20 tokens (the longest 31)" in out
    assert parties.over_max_new_tokens("slm1", tok, evals, public, max_new_tokens=31) == {"slm1": 0, "pool": 0}
    assert capsys.readouterr().out == ""


def test_lada_random_takes_the_counts_of_lada_within_the_host(tmp_path, cache, monkeypatch):
    """v2: `lada`'s A_k is a subset of the host's H_k in every round and direction (plugin_pick's output
    against its input, recorded); `lada-random` picks as many within H_k as `lada` did (--counts_from)."""
    picks, real = [], protocol.plugin_pick

    def recorded(kind, filt, feats, emb, host, cfg, rng, count=None):
        got = real(kind, filt, feats, emb, host, cfg, rng, count)
        picks.append((kind, list(host), got))
        return got

    monkeypatch.setattr(protocol, "plugin_pick", recorded)
    lada = run(["--rounds", "2", "--method", "lada", "--plugin_budget", "3"], tmp_path / "lada", cache)
    assert len(picks) == 2 * 6 and all(k == "filter" for k, _, _ in picks)  # 2 rounds x 3 clients x 2 directions
    assert all(set(a) <= set(h) and len(a) == len(set(a)) and len(a) <= 3 for _, h, a in picks)
    assert any(len(h) > len(a) > 0 for _, h, a in picks)  # the filter did choose somewhere (not all, not none)
    picks.clear()
    rnd = run(["--rounds", "2", "--method", "lada-random", "--counts_from", str(tmp_path / "lada" / "results.json")],
              tmp_path / "random", cache)
    assert all(k == "random" and set(a) <= set(h) for k, h, a in picks)
    host = lambda r: {k: d["H"] for k, d in r["plugin"].items() if "H" in d}  # noqa: E731
    assert host(rnd["rounds"][0]) == host(lada["rounds"][0])  # round 1: same models so far, the same H_k
    for mine, theirs in zip(rnd["rounds"], lada["rounds"]):  # lada's count, or all of H_k where it is smaller
        assert mine["selected"] == {k: min(n, mine["plugin"][k]["H"]) for k, n in theirs["selected"].items()}
