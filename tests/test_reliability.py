"""Reliability: resume loads no pickle, every message is checked by its receiver, a run killed with
SIGKILL at an unlucky moment resumes to an uninterrupted run's numbers, and malformed input gives one
line and exit code 2.

The kills run `federated.main` in child processes of a multiprocessing fork server that has imported
the project once (a fresh `python federated.py` spends ~5 s importing torch and transformers before
it does anything); the uninterrupted reference is a real `python federated.py` subprocess.
"""
import json
import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import eval as ev
import config
import parties
import messages
import federated
import protocol
import models
import store

REPO = Path(__file__).resolve().parents[1]
# a smoke run small enough to start a dozen times: 2 rounds, 3 clients, the LaDa filters with optimism
SMALL = ["--smoke", "--rounds", "2", "--pool_size", "4", "--n_test", "2", "--max_new_tokens", "8", "--local_steps", "1",
         "--warm_llm", "8", "--warm_slm", "6", "--filter_optimism", "0.6"]
PARTIES = ("llm", "slm1", "slm2", "slm3")


def strip(results):
    """What must not change when a run is killed and resumed: every round's accuracies, selections,
    rewards, losses, bytes and errors, and the accuracies after warm-up (not the seconds)."""
    return dict(initial=results["initial"], initial_strict=results["initial_strict"],
                rounds=[{k: v for k, v in r.items() if k not in ("seconds", "phases")} for r in results["rounds"]])


def weights(out):
    return {n: models.load_model(Path(out) / "ckpt" / n)[0].state_dict() for n in PARTIES}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run in a real subprocess (its cache is shared with the in-process tests here)."""
    root = tmp_path_factory.mktemp("ref")
    t0 = time.time()
    p = subprocess.run([sys.executable, str(REPO / "federated.py"), *SMALL, "--out", str(root / "out"), "--cache",
                        str(root / "cache")], cwd=REPO, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads((root / "out" / "results.json").read_text())
    assert [r["round"] for r in res["rounds"]] == [1, 2] and all(not r["errors"] for r in res["rounds"])
    return dict(root=root, out=root / "out", cache=str(root / "cache"), results=res, seconds=time.time() - t0)


# -----------------------------------------------------------------------------
# 1. Resume and the warm-up cache load no pickle

def pickle_bomb(path, marker):
    """A file that writes `marker` when unpickled (torch.load(weights_only=False), pickle.load)."""
    class Bomb:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    torch.save({"round": 1, "opts": Bomb()}, path)


def test_the_pickle_bomb_works(tmp_path):  # the control: the crafted file does run code when unpickled
    pickle_bomb(tmp_path / "x.pt", tmp_path / "marker")
    torch.load(tmp_path / "x.pt", weights_only=False)
    assert (tmp_path / "marker").exists()


def resume_in_process(out, cache, capfd, extra=()):
    capfd.readouterr()
    code = federated.main(SMALL + ["--out", str(out), "--cache", cache, "--resume", *extra])
    err = capfd.readouterr().err.strip().splitlines()
    return code, err


def test_resume_refuses_crafted_and_damaged_state(reference, tmp_path, capfd):
    """Every file of a checkpoint replaced by a pickle that would write a marker, or damaged, and its
    manifest written anew (a crafted checkpoint with consistent checksums; the checksums alone are
    tested in tests/test_trust.py): resume stops with one line naming the file, exit code 2, and the
    marker never appears."""
    marker = tmp_path / "marker"

    def bomb(ck, name):
        pickle_bomb(ck / name, marker)

    def truncate(ck, name):
        (ck / name).write_bytes((ck / name).read_bytes()[:100])

    def edit_state(fn):
        def go(ck):
            st = json.loads((ck / "state.json").read_text())
            fn(st)
            (ck / "state.json").write_text(json.dumps(st))
        return go

    cases = [  # (what to do to the checkpoint, what the one line must say)
        (lambda ck: (bomb(ck, "state.pt")), "state.pt: a pickled state"),
        (lambda ck: bomb(ck, "state.safetensors"), "state.safetensors: not a safetensors file"),
        (lambda ck: ((ck / "llm" / "model.safetensors").unlink(), bomb(ck / "llm", "pytorch_model.bin")),
         "llm: no model.safetensors (pytorch_model.bin is a pickle"),
        (lambda ck: bomb(ck / "slm2", "model.safetensors"), "slm2: cannot load model"),
        (lambda ck: truncate(ck, "state.safetensors"), "state.safetensors: not a safetensors file"),
        (lambda ck: (ck / "state.json").write_text("{\"round\": "), "state.json: not valid JSON"),
        (lambda ck: (ck / "state.json").write_text("[" * 100000 + "]" * 100000), "state.json: not valid JSON"),
        (lambda ck: (ck / "config.json").write_text("nope"), "config.json: not valid JSON"),
        (lambda ck: (ck / "results.json").unlink(), "results.json: missing"),
        (edit_state(lambda st: st.update(round=7)), "does not fit this run"),
        (edit_state(lambda st: st["filters"].pop("down/slm1")), "does not fit this run"),
        (edit_state(lambda st: st.update(opts={"__tensor__": "99999"})), "absent from state.safetensors"),
        (edit_state(lambda st: st.update(evil={"__class__": "os.system"})), "unknown entry '__class__'"),
        (lambda ck: truncate(ck / "slm1", "model.safetensors"), "slm1: cannot load model"),
    ]
    for i, (damage, says) in enumerate(cases):
        out = tmp_path / f"o{i}"
        shutil.copytree(reference["out"], out, symlinks=True)
        damage(out / "ckpt")
        store.write_manifest((out / "ckpt").resolve())
        code, err = resume_in_process(out, reference["cache"], capfd)
        assert code == 2 and len(err) == 1 and says in err[0] and "Traceback" not in err[0], (i, err)
        assert not marker.exists(), i
    # the checkpoint untouched still resumes (to the end: nothing left to run)
    out = tmp_path / "ok"
    shutil.copytree(reference["out"], out, symlinks=True)
    code, err = resume_in_process(out, reference["cache"], capfd)
    assert code == 0 and err == []


def test_warm_up_cache_entry_with_a_pickle_is_refused(reference, tmp_path, capfd):
    cache = tmp_path / "cache"
    shutil.copytree(reference["cache"], cache)
    entry = next(p for p in cache.iterdir() if p.name.startswith("slm1-"))
    (entry / "model.safetensors").unlink()
    pickle_bomb(entry / "pytorch_model.bin", tmp_path / "marker")
    capfd.readouterr()
    code = federated.main(SMALL + ["--out", str(tmp_path / "o"), "--cache", str(cache)])
    err = capfd.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and f"{entry.name}: no model.safetensors" in err[0] and "delete this cache" in err[0]
    assert not (tmp_path / "marker").exists()


@pytest.mark.parametrize("one_file", [False, True], ids=["json+safetensors", "one safetensors file"])
def test_state_round_trip_is_exact(tmp_path, one_file):
    """save_state/load_state (checkpoints) and save_state_file/load_state_file (a Flower client's round in
    progress) against the objects themselves: an AdamW state (int keys, 0-d step tensors, tuples), a
    filter state (RNG bytes, float64 statistics), Python's RNG state, NaN and None."""
    import random

    from filter import LearnabilityFilter

    net = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    net(torch.randn(4, 3)).sum().backward()
    opt.step()
    f = LearnabilityFilter(4, 2, budget=3, min_budget=1, seed=5, optimism=0.6)
    f.select(torch.randn(10, 4), torch.randn(10, 2))
    f.update(torch.randn(3, 4), torch.randn(3, 2), torch.rand(3))
    state = {"opt": opt.state_dict(), "filter": f.state_dict(), "x": [1, 2.5, None, float("nan"), "s", (1, "t")],
             "rng": random.Random(7).getstate()}
    if one_file:
        store.save_state_file(state, tmp_path / "st.safetensors")
        got = store.load_state_file(tmp_path / "st.safetensors")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["st.safetensors"]  # one file, no temporary left
    else:
        store.save_state(state, tmp_path / "st")
        got = store.load_state(tmp_path / "st")

    def same(a, b):
        assert type(a) is type(b) or isinstance(a, dict) and type(b) is dict, (type(a), type(b))  # OrderedDict -> dict
        if isinstance(a, torch.Tensor):
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
        elif isinstance(a, dict):
            assert list(a) == list(b) and all(same(a[k], b[k]) is None for k in a)
        elif isinstance(a, (list, tuple)):
            assert len(a) == len(b) and all(same(x, y) is None for x, y in zip(a, b))
        elif isinstance(a, float) and a != a:
            assert b != b
        else:
            assert a == b
    same(state, got)
    g = LearnabilityFilter(4, 2, budget=3, min_budget=1, seed=5, optimism=0.6)
    g.load_state_dict(got["filter"])
    x, e = torch.randn(12, 4), torch.randn(12, 2)
    assert f.select(x, e).tolist() == g.select(x, e).tolist()  # continues identically (same RNG, nets, stats)
    r, ref = random.Random(), random.Random(7)
    r.setstate(got["rng"])
    assert [r.random() for _ in range(3)] == [ref.random() for _ in range(3)]


def test_a_state_file_that_is_not_one_is_refused_in_one_line(tmp_path):
    """load_state_file reads safetensors and JSON only: a pickle under its name, a safetensors file without
    a state, and a state naming a tensor the file lacks are each a StateError naming the file."""
    from safetensors.torch import save_file

    bad = tmp_path / "work.safetensors"
    torch.save({"x": torch.ones(2)}, bad)  # a pickle
    with pytest.raises(store.StateError, match="work.safetensors: not a safetensors file"):
        store.load_state_file(bad)
    save_file({"0": torch.ones(2)}, str(bad))
    with pytest.raises(store.StateError, match="work.safetensors: no state in its metadata"):
        store.load_state_file(bad)
    save_file({"0": torch.ones(2)}, str(bad), metadata={"state": '{"w": {"__tensor__": "1"}}'})
    with pytest.raises(store.StateError, match="refers to tensor '1', absent from work.safetensors"):
        store.load_state_file(bad)
    with pytest.raises(store.StateError, match="missing"):
        store.load_state_file(tmp_path / "none.safetensors")


# -----------------------------------------------------------------------------
# 2. Every message is checked by its receiver

def test_receive_refuses_each_kind_of_bad_message():
    cfg = dict(method="lada-v1", max_new_tokens=8, max_len=64)
    qs = ["q1", "q2", "q3"]
    good = {"y_slm": ["a", "b", "c"], "logp_slm_yslm": torch.tensor([-1.0, -2.0, -3.0]),
            "logp_slm_yllm": torch.tensor([-4.0, -5.0, -6.0])}
    assert messages.receive(dict(good), "client_paths", 3, cfg) == good
    assert messages.receive(dict(good, logp_slm_yslm=[-1, -2.5, 0.0]), "client_paths", 3, cfg)["logp_slm_yslm"].tolist() \
        == [-1.0, -2.5, 0.0]  # a list of numbers (a transport's JSON) becomes a tensor
    nan = float("nan")
    bad = [
        (None, "is a NoneType, not a dict"),
        ({k: v for k, v in good.items() if k != "logp_slm_yllm"}, "missing fields ['logp_slm_yllm']"),
        (dict(good, private=["x"]), "fields outside the protocol ['private']"),
        (dict(good, nll_gold_slm=torch.zeros(3)), "fields outside the protocol ['nll_gold_slm']"),  # not fedmkt
        (dict(good, y_slm=["a", "b"]), "y_slm has 2 entries for 3"),
        (dict(good, y_slm="abc"), "y_slm must be a list of strings"),
        (dict(good, y_slm=["a", 2, "c"]), "y_slm must be a list of strings"),
        (dict(good, logp_slm_yslm=torch.tensor([-1.0, nan, -1.0])), "logp_slm_yslm[1] is nan"),
        (dict(good, logp_slm_yslm=torch.tensor([-1.0, -1.0, float("inf")])), "logp_slm_yslm[2] is inf"),
        (dict(good, logp_slm_yllm=torch.tensor([-float("inf"), -1.0, -1.0])), "logp_slm_yllm[0] is -inf"),
        (dict(good, logp_slm_yllm=torch.tensor([-1.0, 3.0, -1.0])), "but a log-prob is <= 0"),
        (dict(good, logp_slm_yllm=torch.tensor([1, 2, 3])), "must be a 1-D float tensor"),
        (dict(good, logp_slm_yllm=torch.zeros(3, 1)), "must be a 1-D float tensor"),
        (dict(good, logp_slm_yllm=["-1", "-2", "-3"]), "must be a 1-D float tensor"),
        (dict(good, logp_slm_yllm=[True, False, True]), "must be a 1-D float tensor"),
        (dict(good, y_slm=["a", "b" * 257, "c"]), "y_slm[1] has 257 characters, above the cap of 256"),
        (dict(good, y_slm=["a", "b", "c" * (65 * 2**20)]), "MiB, above the cap of 64 MiB"),
        (dict(good, y_slm=["a", "\ud800", "c"]), "not valid Unicode"),
    ]
    for msg, says in bad:
        with pytest.raises(messages.BadMessage) as e:
            messages.receive(msg, "client_paths", 3, cfg)
        assert says in str(e.value), (says, str(e.value))
    # the server's messages: the pool's questions must be public ones; the gold NLLs come with fedmkt
    pool = {"questions": qs, "y_llm": ["x", "y", "z"], "logp_llm_yllm": torch.zeros(3)}
    assert messages.receive(pool, "pool", 3, cfg, known_questions=set(qs)) == pool
    with pytest.raises(messages.BadMessage, match=r"questions\[2\] is not a public question"):
        messages.receive(dict(pool, questions=["q1", "q2", "secret"]), "pool", 3, cfg, known_questions=set(qs))
    with pytest.raises(messages.BadMessage, match="has 3 entries for 4"):
        messages.receive(pool, "pool", 4, cfg)
    fm = dict(cfg, method="fedmkt")
    with pytest.raises(messages.BadMessage, match=r"missing fields \['nll_gold_llm'\]"):
        messages.receive(pool, "pool", 3, fm)
    with pytest.raises(messages.BadMessage, match=r"nll_gold_llm\[0\] is -2, but a NLL is >= 0"):
        messages.receive(dict(pool, nll_gold_llm=torch.tensor([-2.0, 1.0, 1.0])), "pool", 3, fm)
    with pytest.raises(messages.BadMessage, match=r"logp_llm_yslm\[1\] is nan"):
        messages.receive({"logp_llm_yslm": torch.tensor([0.0, nan, 0.0])}, "llm_score", 3, cfg)


# what a hostile client does to its honest reply in rounds 1, 2, 3, and the reason its receiver logs
# (receive's other refusals are in the test above)
HOSTILE = {
    "slm2": [(lambda r: r["logp_slm_yslm"].__setitem__(1, float("nan")), "logp_slm_yslm[1] is nan"),
             (lambda r: r.update(y_slm=r["y_slm"][:-1]), "y_slm has 3 entries for 4"),
             (lambda r: r["y_slm"].__setitem__(0, "7" * 10**7), "y_slm[0] has 10000000 characters, above the cap of 256")],
    "slm3": [(lambda r: r["logp_slm_yllm"].__setitem__(0, float("inf")), "logp_slm_yllm[0] is inf"),
             (lambda r: r.pop("logp_slm_yllm"), "missing fields ['logp_slm_yllm']"),
             (lambda r: r.update(private_data=["my private example"]), "outside the protocol")],  # (refused by send)
}


def test_hostile_clients_are_refused_and_the_round_goes_on(reference, tmp_path, monkeypatch):
    real = protocol.client_answer
    hits = []

    def answer(client, offer, cfg, rnd, k):
        reply = real(client, offer, cfg, rnd, k)
        if client.name in HOSTILE:
            corrupt, says = HOSTILE[client.name][rnd - 1]
            corrupt(reply)
            hits.append((rnd, client.name, says))
        return reply

    monkeypatch.setattr(protocol, "client_answer", answer)
    rounds = len(HOSTILE["slm2"])
    code = federated.main(SMALL + ["--rounds", str(rounds), "--out", str(tmp_path / "o"), "--cache", reference["cache"]])
    assert code == 0
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    assert len(res["rounds"]) == rounds and len(hits) == 2 * rounds
    for rnd, name, says in hits:
        r = res["rounds"][rnd - 1]
        assert says in r["errors"][name], (rnd, name, r["errors"].get(name))
        assert f"down/{name}" not in r["selected"] and f"up/{name}" not in r["selected"]  # nothing of it was used
    for r in res["rounds"]:  # the honest client's round is whole, and no one else failed
        assert set(r["errors"]) == set(HOSTILE)
        assert {"down/slm1", "up/slm1"} <= set(r["selected"]) and "dard2/slm1" in r["loss"]
        assert all(v == v for v in r["loss"].values())  # no NaN reached a loss


# -----------------------------------------------------------------------------
# 3. SIGKILL at unlucky moments, then resume: the uninterrupted run's numbers every time

def _child(argv, env, log):
    """A fork-server child: federated.main(argv) with `env` set and its output in `log`."""
    os.environ.update(env)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    import federated as fed
    sys.exit(fed.main(argv))


@pytest.fixture(scope="module")
def forkserver():
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["federated", "distill", "eval", "filter", "models", "data", "transformers"])
    return ctx


def run_child(ctx, argv, log, crash_at=None, kill_on=None, kill_after=None):
    """Run federated.main(argv) in a child; kill it with SIGKILL where LADA_CRASH_AT=crash_at has it
    kill itself, when a line of its output contains kill_on, or after kill_after seconds.
    Returns the exit code (-9 when killed)."""
    env = {"LADA_CRASH_AT": crash_at or ""}
    start = log.stat().st_size if log.exists() else 0
    p = ctx.Process(target=_child, args=(argv, env, str(log)))
    p.start()
    t0 = time.time()
    while p.is_alive():
        due = (kill_on is not None and kill_on in log.read_text()[start:]) or \
              (kill_after is not None and time.time() - t0 > kill_after)
        if due:
            try:
                os.kill(p.pid, signal.SIGKILL)
            except ProcessLookupError:  # it ended by itself at that moment (the forkserver reaped it): its exit code says how
                pass
        p.join(0.02)
    return p.exitcode


def check_after_kill(out, cache, reference):
    """What a kill may leave: a checkpoint (if any) that is a whole round equal to the reference's,
    and cache entries that are whole (every visible entry has its info.json)."""
    ck = out / "ckpt"
    if ck.exists():
        saved = json.loads((ck / "results.json").read_text())
        k = len(saved["rounds"])
        assert strip(saved) == dict(strip(reference["results"]), rounds=strip(reference["results"])["rounds"][:k])
        assert store.load_state(ck / "state")["round"] == k
    for e in Path(cache).iterdir() if Path(cache).exists() else []:
        assert e.name.startswith(".") or (e / "info.json").is_file(), e


# kill moments, one process each, in order; each next process resumes the run the kill left behind
COLD = [  # a fresh cache: warm-up and the cache writes
    dict(crash_at="warm_up:17"),                # mid warm-up of the third party, slm2 (llm and slm1 cached)
    dict(crash_at="save_model:1"),              # the first cache write of the resumed run: weights written, info.json not
    dict(crash_at="commit_dir:1"),              # that entry written whole and flushed, not yet renamed into place
    dict(crash_at="round:2"),                   # round 1, after the second client's reply: no checkpoint yet
]
WARM = [  # the warmed-up cache of the reference: the rounds and the checkpoint writes
    dict(crash_at="round:5"),                   # round 2, after the second client's reply (round 1 checkpointed)
    dict(crash_at="checkpoint:1"),              # round 2's checkpoint, half written
    dict(crash_at="commit_link:1"),             # round 2's checkpoint in place, link still on round 1
    dict(crash_at="commit_link_done:1"),        # link switched to round 2; log, report and cleanup not yet written
]


@pytest.mark.parametrize("chain", ["cold", "warm", "random"])
def test_sigkill_then_resume_gives_the_uninterrupted_numbers(reference, forkserver, tmp_path, chain):
    out, log = tmp_path / "out", tmp_path / "log.txt"
    cache = str(tmp_path / "cache") if chain == "cold" else reference["cache"]
    argv = SMALL + ["--out", str(out), "--cache", cache, "--resume"]
    if chain == "random":  # two kills at seeded random moments of a run from the warm cache (~its duration)
        ref = reference["results"]
        span = ref["seconds"]["evaluation"] + sum(r["seconds"] for r in ref["rounds"]) + 1.0
        rng = random.Random(17)
        kills = [dict(kill_after=rng.uniform(0.1, 0.9) * span) for _ in range(2)]
    else:
        kills = COLD if chain == "cold" else WARM
    for i, kill in enumerate(kills):
        code = run_child(forkserver, argv, log, **kill)
        if chain != "random":  # the hook fired (not a normal exit, not an error)
            assert code == -signal.SIGKILL, (kill, code, log.read_text()[-2000:])
        if code != -signal.SIGKILL:
            break  # a random moment after the end: the run is already whole
        print(f"{chain} kill {i + 1} ({kill}): last line before it:", log.read_text().strip().splitlines()[-1][:100])
        check_after_kill(out, cache, reference)
    assert run_child(forkserver, argv, log) == 0, log.read_text()[-2000:]
    got = json.loads((out / "results.json").read_text())
    assert strip(got) == strip(reference["results"])
    ref_w, got_w = weights(reference["out"]), weights(out)
    for n in PARTIES:
        assert all(torch.equal(ref_w[n][k], got_w[n][k]) for k in ref_w[n]), n
    assert len((out / "log.jsonl").read_text().splitlines()) == 2
    left = sorted(p.name for p in out.iterdir() if "ckpt" in p.name)
    assert left == ["ckpt", "ckpt.r0002"] and os.readlink(out / "ckpt") == "ckpt.r0002"  # no leftovers


# -----------------------------------------------------------------------------
# 4. Malformed input: one line naming what and where, exit code 2, no traceback

def numeric_flag_cases():
    """For every numeric flag: NaN, infinities, a value below its range (and above, where it has a
    top), a non-number; plus the relations between flags."""
    cases = []
    for k, v in config.BASE.items():
        if not isinstance(v, (int, float)) or isinstance(v, bool):  # switches (--grad_ckpt) take no value
            continue
        rule = config.RANGES.get(k, ">= 0")
        low = {">= 0": -1, ">= 1": 0, ">= 10": 9, ">= 16": 15, "> 0": 0, "in [0, 1]": -0.5,
               "in [0, 2**32)": -1, "in [-1, 2**32)": -2}[rule]
        vals = [str(low), "abc"] + (["nan", "inf", "-inf"] if isinstance(v, float) else ["1.5", str(2**40)] if "2**32" in rule else ["1.5"])
        if rule == "in [0, 1]":
            vals.append("1.01")
        if k in config.MAXIMA:  # above the bound of a size flag (a run would only end in an allocation failure)
            vals.append(str(config.MAXIMA[k] + 1))
        for x in vals:
            says = "invalid" if x in ("abc", "1.5") else f"--{k} must be"
            cases.append(([f"--{k}={x}"], says))
    cases += [(["--min_budget", "9", "--budget", "4"], "--min_budget 9 is larger than --budget 4"),
              (["--min_steps", "4", "--max_steps", "3"], "--min_steps 4 is larger than --max_steps 3"),
              (["--budget", "0"], "--budget must be an integer >= 1, got 0"),
              (["--rounds", "-3"], "--rounds must be an integer >= 1, got -3"),
              (["--lr", "nan"], "--lr must be a finite number > 0, got nan"),
              (["--threshold", "1.5"], "--threshold must be a finite number in [0, 1], got 1.5"),
              (["--device", "gpu"], "--device must be auto, cpu, cuda or cuda:N"),
              (["--device", "cuda:x"], "--device must be auto, cpu, cuda or cuda:N"),
              (["--dtype", "fp8"], "--dtype must be auto, fp32 or bf16"),
              (["--parties", "huge"], "--parties must be one of"),
              (["--scenario", "mesh"], "invalid choice: 'mesh'"),
              (["--method", "fedprox"], "invalid choice: 'fedprox'"),
              (["--llm_size", "xl"], "invalid choice: 'xl'"),
              (["--rounds"], "expected one argument"),
              (["--no_such_flag", "1"], "unrecognized arguments"),
              (["--slms", "a,,b", "--llm", "x"], "--slms 'a,,b' has an empty entry")]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "asks for a GPU, but CUDA is not available"))
    return cases


def data_file_cases(d: Path):
    """Malformed GSM8K JSONL and MathInstruct JSON/JSONL files: (argv, what the line must say)."""
    ok = {"question": "What is 2 + 2?", "answer": "2 + 2 = 4\n#### 4"}
    okm = {"instruction": "What is 2 + 2?", "output": "The answer is 4"}
    files = {
        "gsm8k": {
            "bad_json_line3.jsonl": [json.dumps(ok), json.dumps(ok), "{not json"],
            "missing_answer.jsonl": [json.dumps(ok), json.dumps({"question": "q"})],
            "number_question.jsonl": [json.dumps({"question": 3, "answer": "#### 3"})],
            "list_line.jsonl": [json.dumps([ok])],
            "string_line.jsonl": [json.dumps(ok), '"just a string"'],
            "null_line.jsonl": ["null"],
            "no_final_answer.jsonl": [json.dumps(ok), json.dumps({"question": "q", "answer": "it is four"})],
            "answer_without_hashes.jsonl": [json.dumps({"question": "q", "answer": "The answer is 4"})],
            "empty_question.jsonl": [json.dumps({"question": "  ", "answer": "#### 4"})],
            "nan_answer.jsonl": ['{"question": "q", "answer": NaN}'],
            "deep.jsonl": ["[" * 50000 + "]" * 50000],
            "empty.jsonl": [],
            "blank.jsonl": ["", "   ", ""],
            "truncated.jsonl": [json.dumps(ok), json.dumps(ok)[:20]],
        },
        "mathinstruct": {
            "bad.json": ["[", json.dumps(okm) + ",", "{oops}", "]"],
            "not_objects.json": [json.dumps([okm, 5])],
            "missing_output.json": [json.dumps([okm, {"instruction": "q"}])],
            "no_number.json": [json.dumps([okm, {"instruction": "q", "output": "no idea"}])],
            "empty_list.json": ["[]"],
            "deep.json": ["[" * 50000 + "]" * 50000],
            "bad_line2.jsonl": [json.dumps(okm), "{,}"],
            "gsm8k_fields.jsonl": [json.dumps(ok)],
        },
    }
    cases = []
    for kind, fs in files.items():
        for name, lines in fs.items():
            (d / name).write_text("\n".join(lines) + ("\n" if lines else ""))
            where = {"bad_json_line3.jsonl": ":3:", "missing_answer.jsonl": ":2:", "string_line.jsonl": ":2:",
                     "no_final_answer.jsonl": ":2:", "truncated.jsonl": ":2:", "bad.json": ":3:",
                     "not_objects.json": ":2:", "missing_output.json": ":2:", "no_number.json": ":2:",
                     "bad_line2.jsonl": ":2:", "number_question.jsonl": ":1:", "deep.jsonl": ":1:"}.get(name, ":")
            cases.append((["--data", f"{kind}:{d / name}"], f"{name}{where}"))
    (d / "latin1.jsonl").write_bytes(json.dumps(ok).encode() + b"\n" + '{"question": "caf\xe9"}'.encode("latin-1"))
    cases.append((["--data", f"gsm8k:{d / 'latin1.jsonl'}"], "latin1.jsonl:2: not UTF-8 text"))
    (d / "a_dir.jsonl").mkdir()
    cases += [(["--data", f"gsm8k:{d / 'a_dir.jsonl'}"], "a_dir.jsonl: no such file"),
              (["--data", f"gsm8k:{d / 'absent.jsonl'}"], "absent.jsonl: no such file"),
              (["--data", "gsm8k"], "bad data spec 'gsm8k'"), (["--data", "squad:x.json"], "bad data spec"),
              (["--data", "gsm8k:"], "bad data spec")]
    few = d / "few.jsonl"
    few.write_text("\n".join(json.dumps({"question": f"q{i}", "answer": f"#### {i}"}) for i in range(5)))
    cases.append((["--data", f"gsm8k:{few}"], "5 records are too few"))
    return cases


def model_dir_cases(d: Path):
    """Malformed --llm/--slms directories: (argv, what the line must say)."""
    corpus = ["Question: What is 2 + 2?\nAnswer:\n2 + 2 = 4\n#### 4"] * 3
    tok = models.build_tokenizer("char", corpus)
    good = d / "good"
    models.save_model(models.build_model(tokenizer=tok, **models.ZOO["llama-tiny"]), tok, good)

    def variant(name, fn):
        p = d / name
        shutil.copytree(good, p)
        fn(p)
        return p

    small_vocab = d / "small_vocab"
    models.save_model(models.build_model(tokenizer=models.build_tokenizer("char", ["ab"]), **models.ZOO["llama-tiny"]),
                      tok, small_vocab)
    (d / "a_file").write_text("x")
    dirs = {
        "missing": (d / "missing", "missing: not a model directory (no config.json)"),
        "file": (d / "a_file", "a_file: not a model directory"),
        "empty": ((d / "empty").mkdir() or d / "empty", "empty: not a model directory"),
        "config_garbage": (variant("config_garbage", lambda p: (p / "config.json").write_text("{oops")), "config.json"),
        "config_list": (variant("config_list", lambda p: (p / "config.json").write_text("[1, 2]")), "config.json"),
        "config_empty": (variant("config_empty", lambda p: (p / "config.json").write_text("{}")), "config.json"),
        "config_unknown": (variant("config_unknown", lambda p: (p / "config.json").write_text('{"model_type": "nope"}')),
                           "config.json"),
        "no_weights": (variant("no_weights", lambda p: (p / "model.safetensors").unlink()), "no model.safetensors"),
        "pickle_weights": (variant("pickle_weights", lambda p: ((p / "model.safetensors").rename(p / "pytorch_model.bin"))),
                           "pytorch_model.bin is a pickle"),
        "weights_truncated": (variant("weights_truncated", lambda p: (p / "model.safetensors").write_bytes(
            (p / "model.safetensors").read_bytes()[:64])), "cannot load model"),
        "weights_text": (variant("weights_text", lambda p: (p / "model.safetensors").write_text("hello")), "cannot load model"),
        "no_tokenizer": (variant("no_tokenizer", lambda p: [(p / f).unlink() for f in ("tokenizer.json", "tokenizer_config.json")]),
                         "cannot load model"),
        "tokenizer_garbage": (variant("tokenizer_garbage", lambda p: (p / "tokenizer.json").write_text("{]")), "cannot load model"),
        "small_vocab": (small_vocab, "the tokenizer has"),
    }
    cases = []
    for name, (path, says) in dirs.items():
        cases.append((["--llm", str(path), "--slms", str(good)], says))
        cases.append((["--llm", str(good), "--slms", f"{good},{path}"], says))
    cases.append((["--llm", str(good)], "--llm and --slms go together"))
    return cases, good


def eval_cases(d: Path, good_model: Path, data_cases):
    ok = d / "ok.jsonl"
    ok.write_text(json.dumps({"question": "What is 2 + 2?", "answer": "#### 4"}) + "\n")
    base = ["--model", str(good_model), "--data", f"gsm8k:{ok}"]
    cases = [(base + ["--limit", "0"], "--limit must be >= 1, got 0"), (base + ["--limit", "-2"], "--limit must be >= 1"),
             (base + ["--limit", "x"], "invalid int value"), (base + ["--batch-size", "0"], "--batch-size must be >= 1"),
             (base + ["--batch-size", "1.5"], "invalid int value"), (base + ["--max-new-tokens", "-1"], "--max-new-tokens must be >= 1"),
             (base + ["--device", "gpu"], "unknown device 'gpu'"), (base + ["--device", "meta"], "--device must be cpu, cuda"),
             (["--data", f"gsm8k:{ok}"], "the following arguments are required: --model"),
             (["--model", str(good_model)], "the following arguments are required: --data"),
             (base + ["--bogus"], "unrecognized arguments"),
             (["--model", str(d / "nope"), "--data", f"gsm8k:{ok}"], "model directory not found")]
    if not torch.cuda.is_available():
        cases.append((base + ["--device", "cuda"], "CUDA is not available"))
    cases += [(["--model", str(good_model)] + argv, says) for argv, says in data_cases  # the same files through eval.py
              if "too few" not in says]  # (eval.py takes any number of records)
    return cases


@pytest.fixture(scope="module")
def malformed(tmp_path_factory):
    d = tmp_path_factory.mktemp("malformed")
    data = data_file_cases(d)
    dirs, good = model_dir_cases(d)
    return dict(flags=numeric_flag_cases(), data=data, dirs=dirs, eval=eval_cases(d, good, data), dir=d)


def one_line_exit_2(fn, argv, says, capfd):
    capfd.readouterr()
    try:
        code = fn(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    except AssertionError as e:
        code = str(e)
    err = capfd.readouterr().err.strip().splitlines()
    ok = code == 2 and len(err) == 1 and says in err[0] and "Traceback" not in err[0]
    return ok, (argv, says, code, err[-3:])


def test_malformed_inputs_give_one_line_and_exit_2(malformed, tmp_path, capfd, monkeypatch):
    """Every generated malformed flag, data file and model directory through federated.main, and the
    flags and data files through eval.main, in process (the count is asserted: at least 200)."""

    def slipped(*a, **k):  # an input that got past the checks fails here at once, not after a whole run
        raise AssertionError("accepted")
    real_build = parties.build_parties
    monkeypatch.setattr(parties, "warm_up", slipped)
    monkeypatch.setattr(parties, "build_parties", lambda *a: real_build(*a) and slipped())
    monkeypatch.setattr(ev, "evaluate", slipped)
    out = ["--out", str(tmp_path / "o"), "--cache", str(tmp_path / "cache")]
    fed = [(["--smoke"] + argv + out, says) for argv, says in malformed["flags"] + malformed["data"] + malformed["dirs"]]
    fails = []
    for argv, says in fed:
        ok, why = one_line_exit_2(federated.main, argv, says, capfd)
        if not ok:
            fails.append(why)
    for argv, says in malformed["eval"]:
        ok, why = one_line_exit_2(ev.main, argv, says, capfd)
        if not ok:
            fails.append(why)
    n = len(fed) + len(malformed["eval"])
    print(f"malformed inputs tried: {n}, refused with one line and exit 2: {n - len(fails)}")
    assert n >= 200 and fails == [], "\n".join(map(str, fails))
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())  # nothing was warmed up


def test_malformed_inputs_through_real_processes(malformed, tmp_path):
    """A handful of the same through `python federated.py` / `python eval.py`: exit code 2, one line on
    stderr, no traceback."""
    out = ["--out", str(tmp_path / "o"), "--cache", str(tmp_path / "c")]
    picks = [("federated.py", ["--smoke", "--lr", "nan"] + out, "--lr must be a finite number > 0, got nan"),
             ("federated.py", ["--smoke"] + malformed["data"][0][0] + out, malformed["data"][0][1]),
             ("federated.py", ["--smoke"] + malformed["dirs"][17][0] + out, malformed["dirs"][17][1]),
             ("eval.py", malformed["eval"][-1][0], malformed["eval"][-1][1])]
    for script, argv, says in picks:
        p = subprocess.run([sys.executable, str(REPO / script), *argv], cwd=tmp_path, capture_output=True, text=True)
        err = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(err) == 1 and says in err[0] and "Traceback" not in p.stderr, (script, argv, err)


BUILD = """import json, sys
sys.path.insert(0, {repo!r})
import config, parties
cfg = config.resolve_config(config.parse_args({flags!r}))
built = parties.build_parties(cfg, parties.make_data(cfg, 1))
print("BUILT", json.dumps({{n: [p.info["cached"], sum(float(t.double().sum()) for t in p.model.state_dict().values())]
                           for n, p in built.items()}}), flush=True)
"""


def test_processes_sharing_a_cache_warm_each_party_up_once(tmp_path):
    """Two real processes build the same parties from one cache at once (as `compare.py --jobs` runs
    do). This test holds the LLM's entry lock first, as a third process warming it up would: both
    builders take the SLM meanwhile (one warms it up, the other waits and loads it), then wait for the
    LLM; once released, one warms the LLM up and the other loads it. Each party is warmed up exactly
    once, and both processes end with the same weights."""
    flags = ["--smoke", "--device", "cpu", "--scenario", "one2one", "--warm_llm", "40", "--warm_slm", "20",
             "--cache", str(tmp_path / "cache")]
    cfg = config.resolve_config(config.parse_args(flags))
    entries = {n: path for n, (path, _) in parties.warm_jobs(cfg, parties.make_data(cfg, 1)).items()}
    assert list(entries) == ["llm", "slm1"]
    held = models.lock_entry(entries["llm"])
    assert held is not None and models.lock_entry(entries["llm"]) is None  # a second open file cannot take it
    script = tmp_path / "build.py"
    script.write_text(BUILD.format(repo=str(REPO), flags=flags))
    logs = [tmp_path / f"builder{i}.log" for i in range(2)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    procs = [subprocess.Popen([sys.executable, str(script)], stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)
             for log in logs]
    try:
        waiting = f"llm: another process is warming it up ({entries['llm']}); waiting for it"
        deadline = time.time() + 300
        while not all(waiting in log.read_text() for log in logs):  # both blocked on the LLM, SLM done
            assert time.time() < deadline and all(p.poll() is None for p in procs), [log.read_text()[-500:] for log in logs]
            time.sleep(0.5)
        assert (entries["slm1"] / "info.json").is_file() and not (entries["llm"] / "info.json").exists()
        held.close()  # the "third process" is done (without storing anything): one builder takes over
        for p in procs:
            assert p.wait(timeout=300) == 0
    finally:
        for p in procs:
            p.kill()
    built = [json.loads(log.read_text().split("BUILT ", 1)[1]) for log in logs]
    for name in ("llm", "slm1"):
        assert sorted(b[name][0] for b in built) == [False, True]  # warmed up by one, loaded by the other
        assert built[0][name][1] == built[1][name][1]
    slm_warmer = 0 if built[0]["slm1"][0] is False else 1
    text = logs[slm_warmer].read_text()
    assert text.index("warm-up slm1") < text.index(waiting)  # it took the SLM while the LLM was held


@pytest.mark.parametrize("peft_installed", [False, True])
def test_lora_range_is_checked_before_peft_is_looked_for(peft_installed, monkeypatch, capfd):
    """A --lora -1 is wrong with or without peft, so it is refused as out of range either way; a valid
    --lora without peft asks for requirements-lora.txt. peft's absence is made here (a None entry in
    sys.modules makes `import peft` fail), its presence faked by a stand-in module, so this test means
    the same whatever is installed."""
    import types

    monkeypatch.setitem(sys.modules, "peft", types.ModuleType("peft") if peft_installed else None)
    ok, why = one_line_exit_2(federated.main, ["--smoke", "--lora=-1"], "--lora must be an integer >= 0, got -1", capfd)
    assert ok, why
    if not peft_installed:
        ok, why = one_line_exit_2(federated.main, ["--smoke", "--lora", "4"], "--lora needs peft", capfd)
        assert ok, why
