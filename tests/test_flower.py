"""The Flower app (flower_app.py) against the in-process loop (federated.py), with real processes: a
SuperLink and one SuperNode per SLM on 127.0.0.1 (insecure mode, free ports), started and stopped
here; `flwr run` submits the runs. Skipped only where flwr is not installed."""
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from optional import need  # noqa: E402

need("flwr")

import federated  # noqa: E402
import flower_records  # noqa: E402
import messages  # noqa: E402
import models  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FLAGS = ["--smoke", "--rounds", "2", "--pool_size", "6", "--n_test", "4", "--max_new_tokens", "24"]
SLMS = ("slm1", "slm2", "slm3")
COMPARED = ("accuracy", "strict", "selected", "reward", "loss", "bytes", "errors")  # all but timings
RUN_TIMEOUT = 900  # seconds one `flwr run` may take on a busy 2-core machine


# -----------------------------------------------------------------------------
# Messages: pack/unpack is lossless, bit for bit


def bits(t):
    return t.flatten().view(torch.uint8).tolist() if t.numel() else []


def test_records_carry_messages_losslessly():
    odd = torch.tensor([0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1e-45, 3.4e38, -1.2345678])
    msg = {"questions": ["", "Tom has 3 apples.", "ünïcødé ✓ 😀\nline two\t"], "y_llm": ["a", "b", "c"],
           "logp_llm_yllm": odd, "nll_gold_llm": torch.zeros(0)}
    weights = {"state_dict": {"layers.0.w": torch.randn(3, 5), "emb.weight": torch.randn(4, 2).to(torch.bfloat16),
                              "pos": torch.arange(6, dtype=torch.int64)}}
    meta, got = flower_records.unpack(flower_records.pack({"pool": msg, "weights": weights}, round=3, report={"x": None}))
    assert meta == {"round": 3, "report": {"x": None}}
    assert got["pool"]["questions"] == msg["questions"] and got["pool"]["y_llm"] == msg["y_llm"]
    for a, b in [(got["pool"]["logp_llm_yllm"], odd), (got["pool"]["nll_gold_llm"], msg["nll_gold_llm"])] + \
            [(got["weights"]["state_dict"][k], v) for k, v in weights["state_dict"].items()]:
        assert a.dtype == b.dtype and a.shape == b.shape
        assert bits(a) == bits(b)  # the same bits (NaN, -0.0 included)
    # the byte accounting of messages.send is the same on either side of the wire
    t1, t2 = {}, {}
    messages.send(msg, "pool", t1, "down")
    messages.send(got["pool"], "pool", t2, "down")
    assert t1 == t2 == {"down": 8 * 4 + sum(len(s.encode()) for s in msg["questions"] + msg["y_llm"])}
    with pytest.raises(RuntimeError, match="outside the protocol"):  # the schema check holds for decoded messages
        messages.send(dict(got["pool"], answer=["42"]), "pool", {}, "down")


# -----------------------------------------------------------------------------
# A federation on loopback


def free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def wait_for_port(port, proc, log, timeout=120):
    t_end = time.time() + timeout
    while time.time() < t_end:
        if proc.poll() is not None:
            pytest.fail(f"{log.name} exited ({proc.returncode}): {log.read_text()[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"nothing listens on port {port} after {timeout} s: {log.read_text()[-2000:]}")


def stop(proc):
    """SIGTERM to the process group started here (the SuperLink/SuperNode and the processes it
    started), then SIGKILL if it has not gone within 20 s."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


class Federation:
    def __init__(self, root: Path):
        self.root, self.procs = root, {}
        bin_dir = str(Path(sys.executable).parent)  # where pip put flwr's commands (Flower calls them by name too)
        self.env = dict(os.environ, FLWR_HOME=str(root / "flwr-home"), PATH=bin_dir + os.pathsep + os.environ["PATH"])
        link, *nodes = free_ports(1 + len(SLMS))
        self.link = link
        (root / "flwr-home").mkdir()
        (root / "flwr-home" / "config.toml").write_text(
            f'[superlink]\ndefault = "test"\n\n[superlink.test]\naddress = "127.0.0.1:{link}"\ninsecure = true\n')
        self.start("superlink", ["flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(link),
                                 "--disable-runtime-dependency-installation"], link)
        for name, port in zip(SLMS, nodes):
            self.start(name, ["flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link}", "--port", str(port),
                              "--node-config", f"party='{name}' dir='{root / 'clients'}'"], port)

    def start(self, name, cmd, port, **env):
        log = self.root / f"{name}.log"
        self.procs[name] = subprocess.Popen(cmd, env=dict(self.env, **env), cwd=self.root, stdout=log.open("w"),
                                            stderr=subprocess.STDOUT, start_new_session=True)
        wait_for_port(port, self.procs[name], log)

    def restart_node(self, name, **env):
        """Stop `name`'s SuperNode and start it again (on a new port), with `env` added to its environment."""
        stop(self.procs[name])
        port, = free_ports(1)
        self.start(name, ["flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{self.link}", "--port", str(port),
                          "--node-config", f"party='{name}' dir='{self.root / 'clients'}'"], port, **env)

    def run(self, flags, out):
        """`flwr run` of the app in this repository with federated.py's flags; waits for the run's end
        (its streamed logs end). Returns the output."""
        cmd = ["flwr", "run", str(REPO), "test", "--stream", "--run-config", f"flags='{' '.join(flags)} --out {out}'"]
        proc = subprocess.Popen(cmd, env=self.env, cwd=self.root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        lines, t_end = [], time.time() + RUN_TIMEOUT
        try:
            for line in proc.stdout:
                lines.append(line)
                if time.time() > t_end:
                    pytest.fail(f"flwr run took over {RUN_TIMEOUT} s:\n{''.join(lines[-40:])}")
            proc.wait(30)
        finally:
            stop(proc)
        return "".join(lines)

    def clients(self, out):
        return self.root / "clients" / Path(out).name

    def close(self):
        for p in self.procs.values():
            stop(p)


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    """The in-process reference run (which also warms up the shared --cache) and the federation."""
    root = tmp_path_factory.mktemp("flower")
    cache = str(root / "cache")
    assert federated.main(FLAGS + ["--out", str(root / "ref"), "--cache", cache]) == 0
    f = Federation(root)
    f.flags, f.ref = FLAGS + ["--cache", cache], json.loads((root / "ref" / "results.json").read_text())
    yield f
    f.close()


def results(out):
    return json.loads((Path(out) / "results.json").read_text())


def strip(rounds):
    return [{k: r[k] for k in COMPARED} for r in rounds]


def same_weights(a, b):
    ma, _ = models.load_model(a)
    mb, _ = models.load_model(b)
    return all(torch.equal(p, q) for p, q in zip(ma.state_dict().values(), mb.state_dict().values()))


def check_checkpoints(fed, out):
    """The server's LLM and each client's SLM equal the in-process run's, weight for weight."""
    ref = fed.root / "ref" / "ckpt"
    assert same_weights(ref / "llm", Path(out) / "ckpt" / "llm")
    for n in SLMS:
        assert same_weights(ref / n, fed.clients(out) / n / "ckpt" / n)
    assert not (Path(out) / "ckpt" / "slm1").exists()  # the SLMs stay at their sites


# -----------------------------------------------------------------------------
# The runs


def test_flower_run_equals_in_process_run(fed):
    out = fed.root / "run"
    log = fed.run(fed.flags, out)
    got = results(out)
    assert len(got["rounds"]) == 2, log[-3000:]
    assert got["initial"] == fed.ref["initial"] and got["initial_strict"] == fed.ref["initial_strict"]
    assert strip(got["rounds"]) == strip(fed.ref["rounds"])  # accuracies, selections, rewards, losses, bytes
    r1 = got["rounds"][0]
    assert set(r1["selected"]) == {f"{d}/{n}" for d in ("down", "up") for n in SLMS} and not r1["errors"]
    assert r1["bytes"]["down"] > r1["bytes"]["up"] > 0
    assert r1["records"]["down"] > r1["bytes"]["down"] and r1["records"]["up"] > r1["bytes"]["up"]
    assert [json.loads(x)["round"] for x in (out / "log.jsonl").read_text().splitlines()] == [1, 2]
    check_checkpoints(fed, out)


@pytest.fixture(scope="module")
def after_round_1(fed):
    """A run stopped after round 1: the server's directory and the clients' (copied by the tests)."""
    out = fed.root / "cut"
    fed.run(fed.flags + ["--rounds", "1"], out)
    assert len(results(out)["rounds"]) == 1
    return out


def copy_run(fed, src, name):
    out = fed.root / name
    shutil.copytree(src, out)
    shutil.copytree(fed.clients(src), fed.clients(out))
    return out


def test_server_resumes_after_round_1(fed, after_round_1):
    out = copy_run(fed, after_round_1, "resumed")
    log = fed.run(fed.flags + ["--resume"], out)
    assert "resuming after round 1" in log
    got = results(out)
    assert strip(got["rounds"]) == strip(fed.ref["rounds"]), log[-3000:]
    assert len((out / "log.jsonl").read_text().splitlines()) == 2
    check_checkpoints(fed, out)


def test_killed_client_is_skipped_and_the_run_finishes(fed, after_round_1):
    out = copy_run(fed, after_round_1, "killed")
    work = fed.clients(out) / "slm2" / "work.safetensors"  # written once slm2 has answered round 2's pool
    node = fed.procs["slm2"]
    t_end = time.time() + RUN_TIMEOUT

    def watch():  # SIGTERM to slm2's SuperNode (and its ClientApp) as soon as it is inside round 2
        while time.time() < t_end and not work.exists():
            time.sleep(0.2)
        stop(node)

    w = threading.Thread(target=watch, daemon=True)
    w.start()
    log = fed.run(fed.flags + ["--resume"], out)
    w.join(30)
    assert node.poll() is not None, "slm2's SuperNode was not stopped"
    got = results(out)
    assert len(got["rounds"]) == 2, log[-3000:]
    r2, ref2 = got["rounds"][1], fed.ref["rounds"][1]
    assert list(r2["errors"]) == ["slm2"] and r2["errors"]["slm2"], r2["errors"]
    assert "slm2" not in r2["accuracy"] and "down/slm2" not in r2["selected"]
    for n in ("slm1", "slm3"):  # the others' round is the uninterrupted one (their learning needs no slm2)
        for key in (f"down/{n}", f"up/{n}"):
            assert r2["selected"][key] == ref2["selected"][key]
        assert r2["reward"].get(f"down/{n}") == ref2["reward"].get(f"down/{n}")
        assert r2["accuracy"][n] == ref2["accuracy"][n]
        assert same_weights(fed.root / "ref" / "ckpt" / n, fed.clients(out) / n / "ckpt" / n)
    assert not math.isnan(r2["accuracy"]["llm"])
    assert (out / "results.md").read_text().count("\n") == 5  # header, rule, rounds 0, 1, 2


def test_a_hostile_client_costs_itself_its_round_never_the_server_its_run(fed):
    """slm3's SuperNode started with LADA_HOSTILE=1 (flower_records.tamper): in round 1 its report claims
    0.99 for the LLM and for slm1; in round 2 its reply's meta is a JSON list. The server keeps only
    slm3's own figures in round 1 (the LLM's and slm1's accuracy are the in-process run's), skips slm3 in
    round 2 with its line in errors, and finishes the run."""
    for n in SLMS:  # a node another test stopped comes back first
        if fed.procs[n].poll() is not None:
            fed.restart_node(n)
    fed.restart_node("slm3", LADA_HOSTILE="1")
    try:
        out = fed.root / "hostile"
        log = fed.run(fed.flags, out)
    finally:
        fed.restart_node("slm3")
    got = results(out)
    assert len(got["rounds"]) == 2, log[-3000:]
    r1, r2, ref1 = got["rounds"][0], got["rounds"][1], fed.ref["rounds"][0]
    assert not r1["errors"] and all(r1["accuracy"][n] == ref1["accuracy"][n] for n in ("llm", "slm1", "slm3"))
    assert r1["accuracy"]["llm"] != 0.99 and r1["eval_n"]["llm"] == ref1["eval_n"]["llm"]
    assert list(r2["errors"]) == ["slm3"] and "JSON list" in r2["errors"]["slm3"], r2["errors"]
    assert "slm3" not in r2["accuracy"] and {"down/slm1", "down/slm2"} <= set(r2["selected"])
    assert json.loads((out / "ckpt" / "results.json").read_text())["rounds"][0]["accuracy"] == r1["accuracy"]


def test_unreadable_records_are_one_bad_message_each():
    """What `unpack` refuses (each a BadMessage with its reason, never another exception): no meta, meta
    that is not JSON, a JSON list, JSON nested past Python's limit, a kind without its .texts record."""
    from flwr.app import ArrayRecord, ConfigRecord, RecordDict

    good = flower_records.pack({"client_paths": {"y_slm": ["a"], "logp_slm_yslm": torch.zeros(1)}}, party="slm1")
    assert flower_records.unpack(good)[0] == {"party": "slm1"}
    cases = {"no meta": RecordDict({}), "not JSON": RecordDict({"meta": ConfigRecord({"json": "{oops"})}),
             "a JSON list": RecordDict({"meta": ConfigRecord({"json": "[1, 2]"})}),
             "nested": RecordDict({"meta": ConfigRecord({"json": "[" * 100000 + "]" * 100000})}),
             "no texts": RecordDict({"meta": ConfigRecord({"json": "{}"}), "client_paths.arrays": ArrayRecord()})}
    for why, rd in cases.items():
        with pytest.raises(messages.BadMessage):
            flower_records.unpack(rd)
