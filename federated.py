"""federated.py: LaDa's federated loop (spec §2), the script a reader follows.

    python federated.py --scenario hetero                    # GPU sizes on a GPU; without one, the CPU preset
    python federated.py --scenario hetero --smoke            # the whole loop on CPU in about a minute
    python federated.py --scenario hetero --preset cpu       # a small testbed, from the shipped bases (bases/)
    python federated.py --scenario hetero --rewarm           # the same, warming every party up here first
    python federated.py --scenario hetero --preset default   # the GPU sizes, wherever it runs
    python federated.py --scenario homo --method fedmkt      # a baseline (local, fedmkt, lada-v1, ...)
    python federated.py --llm DIR --slms DIR,DIR --data gsm8k:PATH   # local checkpoints, real data
    python federated.py --llm DIR --slms DIR,DIR --data gsm8k:PATH --lora 16 --grad_ckpt --max_len 512  # 7B on one GPU
    python federated.py --scenario hetero --smoke --resume   # continue an interrupted run (same flags)

One loop serves every scenario and method (methods.py: spec §2's tables and §4''s plug-in). The round
(`play_round`) is written once for any transport: it calls the server's steps (protocol.server_*)
itself and reaches the clients through `call(stage, {client: messages})`, which here calls each
client's side (protocol.client_exchange) in this process, and in flower_app.py crosses the network.
Writes into --out: log.jsonl (one line per round), results.json, results.md, accuracy.png (with
matplotlib), and ckpt/ (the last finished round, written atomically). Config and flags: config.py;
the parties: parties.py; checkpoints, evaluation and the report: runs.py.
"""
import random
import sys
import time
from pathlib import Path

import torch

import parties as PT
import protocol as P
import runs
from config import config_from_flags
from data import DataError
from methods import METHODS, SCENARIOS
from models import ModelError
from store import crash_point

# -----------------------------------------------------------------------------
# One round of spec §2, for any transport


def play_round(server, names, cfg, rnd, call, log):
    """Round `rnd`: the server's steps here, the clients' through `call(stage, {client: {kind: message}})`,
    which returns {client: {kind: message}} of the clients that answered, checked (a failing client is in
    log.errors and out of the rest of the round). The server's random draws keep one order (offer, then
    each client's pick in the clients' order, then learn), so every transport gives the same numbers."""
    scen, alloc = SCENARIOS[cfg["scenario"]], METHODS[cfg["method"]][0]
    rng = random.Random(f"{cfg['seed']}-{rnd}-llm")  # the server's own randomness this round
    torch.manual_seed(cfg["seed"] * 1000 + rnd)
    if scen["llm_learns"]:
        with log.phase("local"):
            log.losses["local/llm"] = P.local_step(server, cfg, rng)        # 1 (server)
    down = {n: {} for n in names}
    if scen["fedavg"] and cfg["method"] != "local":                         # FedAvg of the SLMs after their 1
        up = call("local", down)
        with log.phase("fedavg"):
            avg = P.average([m["weights"]["state_dict"] for m in up.values()]) if up else {}
        down = {n: {"weights": {"state_dict": avg}} for n in up}
    if alloc is not None:
        with log.phase("2 server_offer"):
            offer = P.server_offer(server, cfg, rnd, rng)                    # 2    server -> clients: "pool"
        down = {n: dict(m, pool=offer) for n, m in down.items()}
    replies = call("answer", down)                                           # (1), 3    clients: "client_paths"
    if alloc is None:
        return
    with log.phase("4 server_score"):                                        # 4    server -> client: "llm_score"
        scores = log.per_client(replies, lambda n: {"llm_score": P.server_score(server, n, replies[n]["client_paths"], cfg)})
    learned = call("learn", scores)                                          # 5, 6, 7 at each client (down: A_k)
    if not scen["llm_learns"]:
        return
    with log.phase("5' server_pick"):                                        # 5'   up: B_k, in the clients' order
        picks = log.per_client(learned, lambda n: P.server_pick(server, n, cfg, rng))
    for n, B in picks.items():
        log.selected[f"up/{n}"] = len(B)
    with log.phase("6'-7' server_learn"):
        got = P.server_learn(server, cfg, rng)                               # 6', 7'
    log.losses.update({f"{k}/llm": v for k, v in got["losses"].items()})
    log.rewards.update({f"up/{n}": r for n, r in got["rewards"].items()})
    log.plugin.update(got.get("plugin", {}))


def in_process(clients: dict, cfg, rnd, log):
    """The transport of one process: `call` runs each client's side (protocol.client_exchange) by a
    function call; what crosses is checked and counted as over a network (RoundLog.count_down, accept)."""
    rng = {n: random.Random(f"{cfg['seed']}-{rnd}-{n}") for n in clients}  # each client's own randomness

    def call(stage, msgs):
        log.count_down(msgs)
        raw = {}
        for n, down in msgs.items():
            try:
                with log.phase(f"clients: {stage}"):
                    raw[n] = P.client_exchange(stage, clients[n], down, cfg, rnd, rng[n])
                if stage == "answer":
                    crash_point("round")  # a test hook (tests/test_reliability.py); nothing unless LADA_CRASH_AT says so
            except Exception as e:
                log.skip(n, e)
        return log.accept(stage, msgs, raw, cfg)
    return call


# -----------------------------------------------------------------------------
# The run: data and parties, then `for rnd in range(rounds)`


def run(cfg):
    out, amp, release = runs.open_run(cfg)  # this process owns --out until the run ends
    try:
        return _run(cfg, out, amp)
    finally:
        release()


def _run(cfg, out, amp):
    dev, scen, setup_times = cfg["device"], SCENARIOS[cfg["scenario"]], {}

    # --- data and parties (spec §1, §6), the filters that live with each student (spec §2)
    splits = PT.make_data(cfg, PT.n_clients(cfg))
    with amp, runs.phase(setup_times, "warm-up", dev):
        parties = PT.build_parties(cfg, splits)
    server, clients = parties["llm"], {n: p for n, p in parties.items() if n != "llm"}
    PT.add_filters(cfg, parties, list(clients))
    if cfg["counts_from"]:  # lada-random (random) at the counts another run's filter picked
        PT.set_counts(cfg, server, list(clients.values()), not scen["llm_learns"])
    models, toks, opts, filters = runs.checkpoint_view(parties)

    # --- a new run, or the last finished round of an interrupted one
    start = 0
    if cfg["resume"] and runs.has_checkpoint(out):
        start, results = runs.load_checkpoint(out, cfg, models, opts, filters)
        print(f"resuming after round {start}")
    else:
        with runs.phase(setup_times, "evaluation", dev):
            ev0 = runs.merge_evaluations(runs.initial_evaluation(cfg, p) for p in parties.values())
        results = runs.new_results(cfg, {n: p.info for n, p in parties.items()}, ev0, setup_times)
    runs.show_start(out, results)

    t_rounds = time.time()
    for rnd in range(start + 1, cfg["rounds"] + 1):
        log = runs.RoundLog(rnd, dev)
        with amp:
            play_round(server, list(clients), cfg, rnd, in_process(clients, cfg, rnd, log), log)
        with log.phase("evaluation"):
            ev = runs.merge_evaluations(runs.evaluate(cfg, p, rnd) for p in parties.values())
        runs.end_round(out, cfg, results, log.entry(ev),
                       lambda: runs.save_checkpoint(out, cfg, rnd, models, toks, opts, filters, results), start, t_rounds)
    runs.write_report(out, results)
    print(runs.summary(results), flush=True)
    return results


def main(argv=None):
    try:
        cfg, notice = config_from_flags(argv)
        if Path(cfg["out"]).exists() and not Path(cfg["out"]).is_dir():
            raise ValueError(f"--out {cfg['out']} is a file, not a directory")
        if notice:
            print(notice, file=sys.stderr, flush=True)
        run(cfg)
    except (DataError, ModelError, ValueError, OSError) as e:  # OSError: a path that cannot be read or written
        print(f"federated.py: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted; continue with: python federated.py {' '.join(argv or sys.argv[1:])} --resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
