"""The server trusts no client, and a run owns its folder: hostile messages, reports and weights are
refused or contained (messages.receive / receive_report / receive_weights, RoundLog.accept); one
process per --out; a resume is checked before any work; checkpoints carry checksums; every size flag
has a bound. The Flower side (a hostile ClientApp in a real federation, unreadable records) is in
tests/test_flower.py."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import config
import federated
import messages
import models
import parties
import protocol
import runs
import store

REPO = Path(__file__).resolve().parents[1]
FAST = ["--smoke", "--rounds", "1", "--pool_size", "4", "--n_test", "2", "--max_new_tokens", "8", "--local_steps", "1",
        "--warm_llm", "8", "--warm_slm", "6"]
CFG = dict(method="lada", max_new_tokens=8, max_len=64, pool_size=4)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def one_line(capfd):
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


# -----------------------------------------------------------------------------
# Messages: what receive used to raise on, now BadMessage

def test_receive_refuses_what_it_used_to_raise_on():
    good = {"y_slm": ["a", "b"], "logp_slm_yslm": [-1.0, -2.0], "logp_slm_yllm": [-3.0, -4.0],
            "nll_gold_slm": [1.0, 2.0]}
    assert set(messages.receive(dict(good), "client_paths", 2, CFG)) == set(good)
    cases = [
        (dict(good, logp_slm_yslm=[-1, -10**400]), "client_paths", CFG, "out of range"),          # OverflowError
        (dict(good, logp_slm_yslm=torch.zeros(2, device="meta")), "client_paths", CFG, "meta"),  # RuntimeError
        ({"state_dict": {}}, "weights", CFG, "not a message kind receive checks"),              # KeyError
        (dict(good), "nonsense", CFG, "not a message kind"),
        (dict(good), "client_paths", dict(CFG, method="fedprox"), "unknown method"),            # KeyError
    ]
    for msg, kind, cfg, says in cases:
        with pytest.raises(messages.BadMessage, match=says):
            messages.receive(msg, kind, 2, cfg)


def test_receive_weights_keeps_bad_clients_out_of_the_average():
    ok = {"w": torch.ones(2, 3), "b": torch.zeros(3)}
    replies = {"slm1": {"state_dict": dict(ok)}, "slm2": {"state_dict": {"w": torch.ones(3, 2), "b": torch.zeros(3)}},
               "slm3": {"state_dict": {"w": torch.ones(2, 3)}}, "slm4": {"state_dict": dict(ok, b=torch.full((3,), float("nan")))},
               "slm5": {"state_dict": dict(ok)}, "slm6": "weights", "slm7": {"state_dict": dict(ok, w=torch.ones(2, 3).double())},
               "slm8": {"state_dict": {"w": torch.empty(2, 3, device="meta"), "b": torch.zeros(3)}}}
    good, bad = messages.receive_weights(replies)
    assert sorted(good) == ["slm1", "slm5"]  # the signature most clients share (3 of 6): w (2, 3), b (3,), float32
    says = {n: str(e) for n, e in bad.items()}
    assert "'w' is [3, 2]" in says["slm2"] and "keys differ" in says["slm3"] and "not finite" in says["slm4"]
    assert "must be {'state_dict'" in says["slm6"] and "float64" in says["slm7"] and "meta" in says["slm8"]
    assert messages.receive_weights({"a": {"state_dict": dict(ok)}, "b": {"state_dict": {"w": torch.ones(1)}}})[0] == {}  # a tie
    avg = protocol.average(list(good.values()))
    assert torch.equal(avg["w"], torch.ones(2, 3)) and torch.isfinite(avg["b"]).all()


def test_receive_report_keeps_a_clients_own_figures_only():
    ev = {"accuracy": {"slm2": 0.5, "llm": 0.99, "slm1": 0.99}, "strict": {"slm2": 0.5, "llm": 0.99},
          "eval_n": {"slm2": 2, "llm": 4}, "correct": {"slm2": "10", "llm": "1111"}}
    got, notes = messages.receive_report({"losses": {"local": 1.5, "sft": float("nan")}, "selected": 3, "reward": 0.25,
                                          "plugin": {"H": 4, "A": 3, "contrast": 1, "imitation": 1, "dropped": 1,
                                                     "dlogp_pos": 0.1, "dlogp_neg": None}, "eval": ev}, "slm2", 4)
    assert got["eval"] == {"accuracy": {"slm2": 0.5}, "strict": {"slm2": 0.5}, "eval_n": {"slm2": 2}, "correct": {"slm2": "10"}}
    assert len(notes) == 1 and "llm, slm1" in notes[0] and got["selected"] == 3
    bad = [("not a dict", []), ("losses", {"losses": {"local/llm": 1.0}}), ("losses", {"losses": {"x": "1"}}),
           ("selected", {"selected": 5}), ("selected", {"selected": True}), ("reward", {"reward": 1.5}),
           ("plugin", {"plugin": {"H": -1}}), ("plugin", {"plugin": {"dlogp_pos": float("inf")}}),
           ("eval", {"eval": {"accuracy": {}}}), ("evaluation", {"eval": dict(ev, correct={"slm2": "11"})}),  # 2 of 2 is not 0.5
           ("a dict of", {"losses": {}, "note": "hi"})]
    for says, report in bad:
        with pytest.raises(messages.BadMessage, match=says):
            messages.receive_report(report, "slm2", 4)


def test_round_log_files_each_client_under_its_own_name(capfd):
    log = runs.RoundLog(1, "cpu")
    msgs = {"slm1": {}, "slm2": {}}
    raw = {"slm1": ({"losses": {"local": 1.0}, "eval": {"accuracy": {"llm": 0.99, "slm1": 0.5}, "strict": {"slm1": 0.5},
                                                        "eval_n": {"slm1": 2}, "correct": {}}}, {}),
           "slm2": ({"losses": {"local": "x"}}, {})}
    replies = log.accept("answer", msgs, raw, dict(CFG, method="local"))
    assert list(replies) == ["slm1"] and log.losses == {"local/slm1": 1.0} and "slm2" in log.errors
    assert log.evals == {"slm1": {"accuracy": {"slm1": 0.5}, "strict": {"slm1": 0.5}, "eval_n": {"slm1": 2}, "correct": {}}}
    err = capfd.readouterr().err
    assert "slm1 reported figures of llm: ignored" in err and "client slm2 failed and is skipped" in err


def test_a_client_with_nan_weights_is_left_out_of_fedavg_and_the_run_goes_on(tmp_path, cache, monkeypatch):
    real = protocol.shared_weights

    def poisoned(model):
        sd = real(model)
        if model is clients.get("slm2"):
            sd = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in sd.items()}
        return sd
    clients, real_build = {}, parties.build_parties

    def build(cfg, splits, only=None):
        got = real_build(cfg, splits, only)
        clients.update({n: p.model for n, p in got.items()})
        return got
    monkeypatch.setattr(protocol, "shared_weights", poisoned)
    monkeypatch.setattr(parties, "build_parties", build)
    assert federated.main(FAST + ["--scenario", "homo", "--method", "fedmkt", "--out", str(tmp_path / "o"), "--cache", cache]) == 0
    r = json.loads((tmp_path / "o" / "results.json").read_text())["rounds"][0]
    assert list(r["errors"]) == ["slm2"] and "not finite" in r["errors"]["slm2"]
    assert "down/slm2" not in r["selected"] and "down/slm1" in r["selected"]
    for n in ("slm1", "slm3"):  # the average reached them, and it is finite
        assert all(torch.isfinite(p).all() for p in clients[n].parameters())


# -----------------------------------------------------------------------------
# A run owns its folder

def test_a_second_process_on_the_same_out_is_refused_and_a_dead_ones_lock_taken_over(tmp_path, capfd):
    out = tmp_path / "o"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".lock").write_text(json.dumps({"pid": holder.pid, "started": store._started(holder.pid)}))
        assert federated.main(FAST + ["--out", str(out), "--cache", str(tmp_path / "c")]) == 2
        assert f"is in use by process {holder.pid}" in one_line(capfd)
    finally:
        holder.kill()
        holder.wait()
    release = store.lock_out(out)  # its process is gone: taken over, said in a line
    assert f"taking over the lock of process {holder.pid}" in capfd.readouterr().err
    assert json.loads((out / ".lock").read_text())["pid"] == os.getpid()
    release()
    assert not (out / ".lock").exists()


def test_two_real_processes_on_one_out(tmp_path, cache):
    """The second of two `federated.py` processes started on one --out stops at once with one line;
    the first finishes and leaves no lock behind."""
    out = tmp_path / "o"
    cmd = [sys.executable, str(REPO / "federated.py"), *FAST, "--rounds", "3", "--out", str(out), "--cache", cache]
    first = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t_end = time.time() + 120
    while not (out / ".lock").exists():
        assert time.time() < t_end and first.poll() is None
        time.sleep(0.1)
    second = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)
    assert first.wait(300) == 0
    err = second.stderr.strip().splitlines()
    assert second.returncode == 2 and len(err) == 1 and f"in use by process {first.pid}" in err[0]
    assert not (out / ".lock").exists() and len(json.loads((out / "results.json").read_text())["rounds"]) == 3


# -----------------------------------------------------------------------------
# Resume: checked first, the config refreshed, checksums, the optimizer state

@pytest.fixture()
def one_round(tmp_path, cache):
    out = tmp_path / "o"
    assert federated.main(FAST + ["--out", str(out), "--cache", cache]) == 0
    return out


def test_a_mismatched_resume_is_refused_before_any_work(one_round, cache, monkeypatch, capfd):
    def no_work(*a, **k):
        raise AssertionError("data or parties were built before the config was checked")
    monkeypatch.setattr(parties, "make_data", no_work)
    monkeypatch.setattr(parties, "build_parties", no_work)
    capfd.readouterr()
    assert federated.main(FAST + ["--out", str(one_round), "--cache", cache, "--resume", "--beta", "0.3"]) == 2
    assert "was made with a different config (beta=0.1)" in one_line(capfd)
    cfg = config.resolve_config(config.parse_args(FAST + ["--cache", "elsewhere", "--device", "cpu"]))
    runs.check_resume(one_round, dict(cfg, out=str(one_round), resume=True))  # cache, device, out: result-neutral


def test_resume_rewrites_the_config_and_extends_the_run(one_round, cache):
    assert federated.main(FAST + ["--out", str(one_round), "--cache", cache, "--resume", "--rounds", "2"]) == 0
    res = json.loads((one_round / "results.json").read_text())
    assert len(res["rounds"]) == 2 and res["config"]["rounds"] == 2


@pytest.mark.parametrize("damage", ["safetensors byte", "results config"])
def test_a_damaged_checkpoint_file_is_refused_by_its_checksum(one_round, cache, capfd, damage):
    ck = one_round / "ckpt"
    if damage == "safetensors byte":
        f = ck / "slm1" / "model.safetensors"
        b = bytearray(f.read_bytes())
        b[len(b) // 2] ^= 0x01  # one flipped bit in the weights: still a valid file, other numbers
        f.write_bytes(bytes(b))
    else:
        f = ck / "results.json"
        res = json.loads(f.read_text())
        res["config"]["beta"] = 0.9
        f.write_text(json.dumps(res))
    capfd.readouterr()
    assert federated.main(FAST + ["--out", str(one_round), "--cache", cache, "--resume", "--rounds", "2"]) == 2
    assert f"{f}: its SHA-256 differs" in one_line(capfd)


def test_a_moved_optimizer_tensor_is_refused_with_one_line(one_round, cache, capfd):
    """Two of slm1's AdamW moments swapped in the state file (the manifest written anew, as a consistent
    but wrong checkpoint would have it): refused at resume, not a traceback at the first step."""
    ck = one_round / "ckpt"
    tree = json.loads((ck / "state.json").read_text())
    state = store.load_state(ck / "state")["opts"]["slm1"]["state"]
    a = next(iter(state))
    b = next(k for k in state if state[k]["exp_avg"].shape != state[a]["exp_avg"].shape)
    refs = {k: v for k, v in tree["opts"]["slm1"]["state"]["__dict__"]}  # the same dicts as in the tree
    refs[a]["exp_avg"], refs[b]["exp_avg"] = refs[b]["exp_avg"], refs[a]["exp_avg"]
    (ck / "state.json").write_text(json.dumps(tree))
    store.write_manifest(ck.resolve())
    capfd.readouterr()
    assert federated.main(FAST + ["--out", str(one_round), "--cache", cache, "--resume", "--rounds", "2"]) == 2
    assert "the optimizer of slm1: 'exp_avg' of parameter" in one_line(capfd)


# -----------------------------------------------------------------------------
# Sizes and the cache

@pytest.mark.parametrize("flag,value", [("embed_dim", 10**12), ("max_new_tokens", 10**12), ("pool_size", 10**9),
                                        ("max_len", 2**25)])
def test_every_size_flag_has_a_bound(flag, value, tmp_path, capfd):
    assert federated.main(["--smoke", f"--{flag}", str(value), "--out", str(tmp_path / "o")]) == 2
    assert f"--{flag} must be at most {config.MAXIMA[flag]}, got {value}" in one_line(capfd)


def test_a_killed_cache_write_leaves_nothing_for_good(tmp_path, cache):
    cfg = config.resolve_config(config.parse_args(FAST + ["--cache", str(tmp_path / "c"), "--device", "cpu",
                                                          "--scenario", "one2one"]))
    entry = parties.warm_jobs(cfg, parties.make_data(cfg, 1))["slm1"][0]
    left = store.atomic_dir(entry)  # what a write killed halfway leaves beside the entry
    (left / "model.safetensors").write_bytes(b"half")
    parties.build_parties(cfg, parties.make_data(cfg, 1), only=["slm1"])
    assert (entry / "info.json").is_file() and not left.exists()
    assert not [p for p in entry.parent.iterdir() if p.name.startswith(f".{entry.name}.") and p.is_dir()]
    assert models.load_cached_party(entry) is not None


def test_the_end_of_a_run_is_one_table_and_what_to_run_next():
    """runs.summary on a hand-made result: 2 rounds, 1.5 + 2.5 MB down, 0.5 + 0.5 MB up, 10 s of set-up
    and 20 + 30 s of rounds."""
    res = {"config": {"method": "lada", "scenario": "hetero"}, "initial": {"llm": 0.5, "slm1": 0.125},
           "initial_correct": {"llm": "10", "slm1": "10000000"}, "seconds": {"warm-up": 8.0, "evaluation": 2.0},
           "rounds": [{"round": 1, "accuracy": {"llm": 0.5, "slm1": 0.25}, "bytes": {"down": 1.5e6, "up": 0.5e6}, "seconds": 20.0},
                      {"round": 2, "accuracy": {"llm": 1.0, "slm1": 0.375}, "bytes": {"down": 2.5e6, "up": 0.5e6}, "seconds": 30.0}]}
    lines = runs.summary(res).splitlines()
    assert lines[0].split() == ["party", "after", "warm-up", "after", "round", "2", "problems"]
    assert lines[1].split() == ["llm", "50.0%", "100.0%", "2"] and lines[2].split() == ["slm1", "12.5%", "37.5%", "8"]
    assert lines[3] == "sent 4.00 MB down, 1.00 MB up in 2 round(s); 60 s (10 s warm-up and round-0 evaluation, 50 s rounds)"
    assert "--method fedmkt" in lines[4] and "docs/study.md" in lines[4]
