"""flower_app.py: the round of spec §2 with every party on its own machine, over Flower (optional).

    pip install -r requirements.txt -r requirements-flower.txt                     # every machine
    flower-superlink --insecure --disable-runtime-dependency-installation            # the server
    flower-supernode --insecure --superlink SERVER:8000 --node-config "party='slm1'" # client 1's site
    ...                                                                              # one per SLM
    flwr run . lada --stream --run-config "flags='--scenario hetero --smoke'"        # docs/flower.md: the connection

Transport only. The ServerApp holds the LLM, the public data and the up-filters F_k^up and plays each
round with federated.play_round, whose `call` (`flower_call`) carries a stage's messages to the
clients and their checked replies back; each ClientApp holds one SLM (chosen by the node's `party`),
its private data and its down-filter F_k^down, and answers each stage with protocol.client_exchange.
What crosses is exactly messages.SCHEMA's dicts, encoded losslessly into Flower records
(flower_records.py), plus a small report per client (its counts, losses and accuracy, filed under its
own name). `flags` are federated.py's flags: the same flags give the same results as federated.py.

Flower starts a fresh ClientApp process for every message, so a client keeps its state on disk in
<dir>/<name of --out>/<party>/ (node config `dir`, default the SuperNode's working directory):
ckpt/ (its last finished round, in federated.py's checkpoint layout), prev/ckpt (the round before,
kept in case the server redoes a round after a restart) and work.safetensors (the round in progress).
"""
import fcntl
import json
import os
import random
import shlex
import shutil
import sys
import time
import traceback
from pathlib import Path

import torch
from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

import federated as F
import flower_records as R
import messages as M
import parties as PT
import protocol as P
import runs
from config import config_from_flags
from data import DataError
from distill import autocast
from models import ModelError
from store import load_state_file, save_state_file

CLIENT_ERROR = 2  # the code of Flower's own "ClientApp raised an exception" error

# -----------------------------------------------------------------------------
# Configuration: federated.py's flags, the same on every machine (+ what is local to a node)

WORK = "work.safetensors"  # a client's round in progress, between two of its stages (save_work)
NODE_FLAGS = ("device", "dtype", "cache")  # may differ per machine: where it computes, where it caches warm-ups


def config_of(run_config, node_config=None) -> dict:
    """cfg from the run's `flags` (federated.py's command line) and the node's own device/dtype/cache."""
    argv = shlex.split(str(run_config.get("flags", "")))
    for k in NODE_FLAGS:
        if node_config and k in node_config:
            argv += [f"--{k}", str(node_config[k])]
    try:
        cfg, notice = config_from_flags(argv)
    except SystemExit:  # argparse said what was wrong on stderr
        raise ValueError(f"bad flags: {' '.join(argv)}") from None
    if notice:
        print(notice, file=sys.stderr, flush=True)
    return cfg


def slm_names(cfg) -> list[str]:
    return [f"slm{k + 1}" for k in range(PT.n_clients(cfg))]


def autocast_of(cfg):  # bf16 on CUDA, as in federated.run
    return autocast(cfg["device"], cfg["dtype"])


# -----------------------------------------------------------------------------
# The client: one SLM, its private data, its down-filter. Each stage is one message.

client = ClientApp()


def round_of(d: Path) -> int:
    return json.loads((d / "results.json").read_text())["round"]


def restore(cfg, party, cdir: Path, rnd: int) -> int:
    """Load the client's last finished round before `rnd` (ckpt/, or prev/ckpt when the server redoes
    a round it had not committed); 0 = none, the warmed-up party. Returns that round."""
    have = {d: round_of(d) for d in (cdir / "ckpt", cdir / "prev" / "ckpt") if (d / "results.json").is_file()}
    if any(r > rnd for r in have.values()) or (rnd == 1 and have and not cfg["resume"]):
        raise ValueError(f"{cdir} holds another run (round {max(have.values())}, the server starts round {rnd}); "
                         "use another --out, or --resume")
    for d, r in sorted(have.items(), key=lambda kv: -kv[1]):
        if r < rnd:
            runs.load_checkpoint(d.parent, cfg, {party.name: party.model}, {party.name: party.opt}, down_filters(party))
            return r
    return 0


def down_filters(party):
    return {f"down/{party.name}": party.filters["down"]} if "down" in party.filters else {}


def save_work(cdir, party, rnd, rng):
    """The round in progress (between two messages), in one atomic write."""
    save_state_file(dict(round=rnd, model=party.model.state_dict(), opt=party.opt.state_dict(),
                         filters={k: f.state_dict() for k, f in down_filters(party).items()}, rng=rng.getstate(),
                         state=party.state), cdir / WORK)


def load_work(cdir, party, rnd):
    w = load_state_file(cdir / WORK)  # safetensors + JSON: nothing read runs code
    if w["round"] != rnd:
        raise RuntimeError(f"{cdir}: the work in progress is of round {w['round']}, not {rnd}")
    party.model.load_state_dict(w["model"])
    party.opt.load_state_dict(w["opt"])
    for k, f in down_filters(party).items():
        f.load_state_dict(w["filters"][k])
    party.state = w["state"]
    rng = random.Random()
    rng.setstate(w["rng"])
    return rng


def finish(cfg, party, cdir, rnd, report) -> dict:
    """The client's end of round: its evaluation and its checkpoint (the one before kept as prev/)."""
    with autocast_of(cfg):
        report["eval"] = runs.evaluate(cfg, party, rnd)
    ck = cdir / "ckpt"
    if ck.exists():  # keep the round before as prev/ckpt: the directory that the link ckpt names
        shutil.rmtree(cdir / "prev", ignore_errors=True)
        (cdir / "prev").mkdir()
        os.replace(ck.resolve(), cdir / "prev" / "ckpt")
        if ck.is_symlink():
            ck.unlink()
    n = party.name
    runs.save_checkpoint(cdir, cfg, rnd, {n: party.model}, {n: party.tok}, {n: party.opt}, down_filters(party),
                         {"party": n, "round": rnd, "report": report})
    (cdir / WORK).unlink(missing_ok=True)
    return report


def client_stage(stage, msg, context) -> Message:
    """Run one stage of the client's round; a failure goes back as a Flower Error whose reason is
    "Type: text", as federated.run logs it."""
    try:
        meta, got = R.unpack(msg.content)
        cfg = config_of(context.run_config, context.node_config)
        name = str(context.node_config.get("party", ""))
        if name not in slm_names(cfg):
            raise ValueError(f"node config party={name!r}: must be one of {', '.join(slm_names(cfg))}")
        cdir = Path(str(context.node_config.get("dir", "."))) / Path(cfg["out"]).name / name
        cdir.mkdir(parents=True, exist_ok=True)
        with open(cdir / ".lock", "w") as lock:  # one stage at a time (one of a stopped run may still be finishing)
            fcntl.flock(lock, fcntl.LOCK_EX)
            out_meta, out = (stage_setup(cfg, name, cdir, meta, got) if stage == "setup" else
                             stage_round(stage, cfg, name, cdir, meta, got))
        for kind, m in out.items():  # the schema check of what leaves this machine
            M.send(m, kind, {}, "up")
        return Message(R.tamper(R.pack(out, **out_meta), stage, meta.get("round", 0)), reply_to=msg)
    except Exception as e:
        traceback.print_exc()
        return Message(Error(code=CLIENT_ERROR, reason=f"{type(e).__name__}: {e}"), reply_to=msg)


def stage_setup(cfg, name, cdir, meta, got):
    """Which party this node is; with `evaluate`, its warm-up (cached) and accuracy before round 1."""
    if not meta["evaluate"]:
        return dict(party=name), {}
    party = PT.build_some(cfg, [name])[name]
    with autocast_of(cfg):
        ev = runs.initial_evaluation(cfg, party)  # read from the warm-up cache when there
    return dict(party=name, info=party.info, eval=ev), {}


def stage_round(stage, cfg, name, cdir, meta, got):
    """One exchange of the round at this client (protocol.client_exchange), between the client's state on
    disk: the round starts from the last finished round (with "local", or "answer" without FedAvg) or
    goes on from the work in progress; it ends with the client's evaluation and checkpoint (`finish`)."""
    rnd = meta["round"]
    party = PT.build_some(cfg, [name])[name]
    if stage == "learn" or (stage == "answer" and "weights" in got):
        rng = load_work(cdir, party, rnd)
    else:
        restore(cfg, party, cdir, rnd)
        rng = random.Random(f"{cfg['seed']}-{rnd}-{name}")  # the party's own randomness, as in federated.run
        torch.manual_seed(cfg["seed"] * 1000 + rnd)
    with autocast_of(cfg):
        report, out = P.client_exchange(stage, party, got, cfg, rnd, rng)
    if stage == "local" or (stage == "answer" and out):  # the round goes on at this client
        save_work(cdir, party, rnd, rng)
        return dict(party=name, report=report), out
    return dict(party=name, report=finish(cfg, party, cdir, rnd, report)), out




@client.query("setup")
def _setup(msg: Message, context: Context) -> Message:
    return client_stage("setup", msg, context)


@client.train("local")
def _local(msg: Message, context: Context) -> Message:
    return client_stage("local", msg, context)


@client.train("answer")
def _answer(msg: Message, context: Context) -> Message:
    return client_stage("answer", msg, context)


@client.train("learn")
def _learn(msg: Message, context: Context) -> Message:
    return client_stage("learn", msg, context)


# -----------------------------------------------------------------------------
# The server: the LLM, the public data, the up-filters; it drives the round.

server = ServerApp()


def exchange(grid, nodes, stage, rnd, payloads, errors, timeout, wire, **meta) -> dict:
    """Send each client in `payloads` ({name: {kind: SCHEMA message}}) its message of `stage` and wait
    for the replies, at most `timeout` seconds. Returns {name: (meta, {kind: message})} of the clients
    that answered, in the clients' order; each other one gets its line in `errors` (as federated.run
    logs a failing client) and is skipped for the rest of the round."""
    mtype = ("query." if stage == "setup" else "train.") + stage
    msgs = []
    for n, p in payloads.items():
        rd = R.pack(p, round=rnd, **meta)
        wire["down"] = wire.get("down", 0) + R.record_bytes(rd)
        msgs.append(Message(rd, dst_node_id=nodes[n], message_type=mtype, group_id=str(rnd)))
    ids = {i: n for i, n in zip(grid.push_messages(msgs), payloads) if i}
    for n in payloads:
        if n not in ids.values():
            errors[n] = "RuntimeError: the SuperLink did not take the message"
    got, t_end = {}, time.time() + timeout
    while len(got) < len(ids) and time.time() < t_end:
        for r in grid.pull_messages([i for i, n in ids.items() if n not in got]):
            got[ids[r.metadata.reply_to_message_id]] = r
        time.sleep(0.2)
    out = {}
    for n in payloads:
        r = got.get(n)
        if n in errors:
            continue
        if r is None:
            errors[n] = f"TimeoutError: no reply to '{stage}' within {timeout:.0f} s"
        elif r.has_error():
            errors[n] = r.error.reason
        else:
            wire["up"] = wire.get("up", 0) + R.record_bytes(r.content)
            try:
                out[n] = R.unpack(r.content)
                continue
            except M.BadMessage as e:
                errors[n] = f"BadMessage: {e}"
        print(f"{'setup' if stage == 'setup' else f'round {rnd}'}: {n} failed and is skipped ({errors[n]})",
              file=sys.stderr, flush=True)
    return out


def find_clients(grid, names, evaluate, timeout) -> tuple[dict, dict]:
    """({party: node id}, {party: its setup reply}): asks every SuperNode that connects which party it
    holds (and, for a new run, its accuracy after warm-up) until each of `names` is found."""
    nodes, setup, asked, errors, t_end = {}, {}, set(), {}, time.time() + timeout
    while any(n not in nodes for n in names) and time.time() < t_end:
        new = {f"node{i}": i for i in grid.get_node_ids() if i not in asked}
        asked.update(new.values())
        for key, (meta, _) in exchange(grid, new, "setup", 0, {k: {} for k in new}, errors, timeout, {},
                                       evaluate=evaluate).items():
            party = meta.get("party")
            try:
                if party not in names:
                    raise M.BadMessage(f"it holds party {str(party)[:40]!r}, not one of {', '.join(names)}")
                if party in nodes:
                    raise M.BadMessage(f"party {party} is held by node {nodes[party]} already (node config party=...)")
                if evaluate:  # its accuracy after warm-up: its own figures only
                    meta["eval"] = M.receive_report({"eval": meta.get("eval")}, party, 0)[0]["eval"]
                    meta["info"] = meta["info"] if isinstance(meta.get("info"), dict) else {}
            except M.BadMessage as e:
                print(f"setup: node {new[key]} is not taken: {e}", file=sys.stderr, flush=True)
                continue
            nodes[party], setup[party] = new[key], meta
        time.sleep(1)
    missing = [n for n in names if n not in nodes]
    if missing:
        raise RuntimeError(f"no SuperNode holds {', '.join(missing)} after {timeout:.0f} s "
                           f"(--node-config \"party='...'\"); {len(asked)} connected; errors: {errors}")
    print("clients:", {n: nodes[n] for n in names}, flush=True)
    return {n: nodes[n] for n in names}, setup


@server.main()
def main(grid: Grid, context: Context) -> None:
    try:
        serve(grid, context)
    except (DataError, ModelError, ValueError, FileNotFoundError) as e:  # what the user gave: say it in one line
        print(f"flower_app.py: error: {e}", file=sys.stderr, flush=True)
        raise  # and Flower marks the run failed


def flower_call(grid, nodes, cfg, rnd, log, timeout, wire):
    """`call` of federated.play_round over Flower: a stage's messages go out as Flower records, each
    client's reply comes back as (its report, its messages) and is checked by the server like any
    other (RoundLog.accept): a reply that cannot be read, is not from the node's party, or fails a
    check costs that client its round. A client's evaluation arrives with its round's last reply."""
    def call(stage, msgs):
        log.count_down(msgs)
        raw = {}
        for n, (meta, up) in exchange(grid, nodes, stage, rnd, msgs, log.errors, timeout, wire).items():
            if meta.get("party") != n:
                log.skip(n, M.BadMessage(f"the reply names party {str(meta.get('party'))[:40]!r}, not {n}"))
                continue
            raw[n] = (meta.get("report"), up)
        return log.accept(stage, msgs, raw, cfg)
    return call


def serve(grid: Grid, context: Context) -> None:
    """The server's side of federated.run: setup, then `for rnd in range(start + 1, rounds + 1)`, each
    round federated.play_round over `flower_call`."""
    cfg = config_of(context.run_config)
    timeout = float(context.run_config.get("timeout", 3600))  # seconds a stage waits for the clients' replies
    out, amp, release = runs.open_run(cfg)  # the server owns --out until the run ends
    try:
        _serve(grid, cfg, timeout, out, amp)
    finally:
        release()


def _serve(grid, cfg, timeout, out, amp):
    dev, names, setup_times = cfg["device"], slm_names(cfg), {}

    # --- the LLM (warmed up or cached) and its up-filters; the clients' SuperNodes
    with runs.phase(setup_times, "warm-up", dev):
        server = PT.build_some(cfg, ["llm"])["llm"]
    resume = cfg["resume"] and runs.has_checkpoint(out)
    nodes, setup = find_clients(grid, names, not resume, timeout)
    start = 0
    if resume:
        start, results = runs.load_checkpoint(out, cfg, {"llm": server.model}, {"llm": server.opt}, server.filters)
        print(f"resuming after round {start}")
    else:
        with amp, runs.phase(setup_times, "evaluation", dev):
            ev = runs.initial_evaluation(cfg, server)
        results = runs.new_results(cfg, {"llm": server.info, **{n: setup[n]["info"] for n in names}},
                                   runs.merge_evaluations([ev] + [setup[n]["eval"] for n in names]), setup_times)
    runs.show_start(out, results)

    t_rounds = time.time()
    for rnd in range(start + 1, cfg["rounds"] + 1):
        log, wire = runs.RoundLog(rnd, dev), {}
        with amp:
            F.play_round(server, names, cfg, rnd, flower_call(grid, nodes, cfg, rnd, log, timeout, wire), log)
        # --- evaluation (the LLM here; each client evaluated itself at its round's end), log, checkpoint
        with amp, log.phase("evaluation"):
            ev = runs.evaluate(cfg, server, rnd)
        entry = log.entry(runs.merge_evaluations([ev] + [log.evals[n] for n in names if n in log.evals]))
        entry["records"] = wire  # bytes of the Flower records (arrays with .npy headers, text, per-message meta)
        runs.end_round(out, cfg, results, entry,
                       lambda: runs.save_checkpoint(out, cfg, rnd, {"llm": server.model}, {"llm": server.tok},
                                                    {"llm": server.opt}, server.filters, results), start, t_rounds)
    runs.write_report(out, results)
    print(runs.summary(results), flush=True)
