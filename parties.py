"""parties.py: the data splits and the parties of a run: each party's model (warmed up on its own
data and cached, or loaded from a checkpoint directory), tokenizer, optimizer, local data,
evaluation sets and filters (spec §1, §2, §6).
"""
import json
import random
import time
from pathlib import Path


import config
import data
from data import with_solutions
from distill import TokenizedSet, autocast, make_optimizer, warm_up
from filter import FEATURE_DIM, LearnabilityFilter
from lora import base_dtype, check_parties, prepare
from memory import check, meta_model
from methods import PLUGIN, SCENARIOS, uses_filter
from models import copy_base, load_cached_party, load_model, lock_entry, n_params, new_party, party_cache_dir, save_model
from store import remove_temps

def n_clients(cfg) -> int:
    """How many SLMs the run has: the scenario's, or one per --slms directory."""
    return len(cfg["slms"].split(",")) if cfg["slms"] else len(config.party_specs(cfg)) - 1


def make_data(cfg, num_clients):
    """Public pool and per-client data: generated (spec §6), or split from --data (IID shards)."""
    if cfg["data"] is None:
        return data.make_splits(num_clients, cfg["n_public"], cfg["n_private"], cfg["n_test"], cfg["n_val"],
                                cfg["n_general"], cfg["dirichlet"], cfg["data_seed"], (cfg["min_steps"], cfg["max_steps"]),
                                cfg["max_value"], [d for d in cfg["private_only"].split(",") if d], cfg["private_only_share"])
    rows = list({r["question"].strip(): r for r in data.load_dataset(cfg["data"])}.values())  # one row per question
    random.Random(cfg["data_seed"]).shuffle(rows)  # then disjoint slices: no question in two splits
    n_hold = (num_clients + 1) * (cfg["n_test"] + cfg["n_val"])
    if len(rows) < n_hold + 2 * (num_clients + 1):
        raise data.DataError(f"{cfg['data']}: {len(rows)} records are too few for {num_clients + 1} parties' "
                             f"test and validation sets (--n_test {cfg['n_test']}, --n_val {cfg['n_val']})")
    hold, rest = rows[:n_hold], rows[n_hold:]
    tv = cfg["n_test"] + cfg["n_val"]
    part = lambda i: (hold[i * tv:i * tv + cfg["n_val"]], hold[i * tv + cfg["n_val"]:(i + 1) * tv])
    shards = [rest[i::num_clients + 1] for i in range(num_clients + 1)]  # shard 0 = public
    splits = {"public": shards[0], "public_val": part(0)[0], "public_test": part(0)[1], "general": [], "clients": []}
    for k in range(num_clients):
        val, test = part(k + 1)
        splits["clients"].append({"private": shards[k + 1], "val": val, "test": test})
    return splits


class Party:
    """One party of spec §2: its model, tokenizer and optimizer, its local data (tokenized once), its
    evaluation sets ({key: examples}, `eval_sets`), and the filters that live with it (each filter lives with its student). `state` holds
    what the party computed this round and keeps to itself (its own paths and their scores)."""

    def __init__(self, name, model, tok, cfg, local, evals, public, info):
        self.name, self.model, self.tok, self.info, self.evals = name, model, tok, info, evals
        self.opt = make_optimizer(model, cfg["lr_llm"] if name == "llm" else cfg["lr"])
        self.local = TokenizedSet(tok, local, cfg["max_len"], name=name)  # D_pub for the LLM, D_k for client k
        self.public = public  # D_pub is held by the server and visible to all [host]
        self.gold = {p["question"]: p["answer"] for p in public}  # so every party checks paths itself
        self.grading = cfg["grading"]
        self.filters, self.state = {}, {}
        self.counts = {}  # (round, "down" | "up/<client>") -> samples `random` allocates (--counts_from)
        self.warm_dir = None  # its warm-up cache entry, where it came from one (build_parties)
        self.info["over_max_new_tokens"] = over_max_new_tokens(name, tok, evals, public, cfg["max_new_tokens"])


def over_max_new_tokens(name, tok, evals, public, max_new_tokens) -> dict:
    """How many gold solutions of the party's evaluation sets and of the pool need more than
    max_new_tokens tokens (with EOS) under its tokenizer: such a problem cannot be solved in the
    generation budget. Counted, and said in one line when any is."""
    sets = dict(evals, pool=[p for p in public if not p.get("answer_only")])
    out = {}
    for key, examples in sets.items():
        lengths = [len(ids) + 1 for ids in tok([e["answer"] for e in examples], add_special_tokens=False).input_ids] if examples else []
        out[key] = sum(n > max_new_tokens for n in lengths)
        if out[key]:
            print(f"{name}: {out[key]} of {len(lengths)} solutions of its {key} set need more than --max_new_tokens "
                  f"{max_new_tokens} tokens (the longest {max(lengths)}); it cannot solve those problems", flush=True)
    return out


def build_parties(cfg, splits, only=None) -> dict:
    """{name: Party} for the LLM and the SLMs (or the names in `only`): warmed up on their own data
    (cached; processes that share the cache warm each party up once), or loaded."""
    dev = cfg["device"]
    warm_dirs = {}  # name -> its warm-up cache entry (parties of the zoo only)
    if cfg["llm"] or cfg["slms"]:
        if not (cfg["llm"] and cfg["slms"]):
            raise ValueError("--llm and --slms go together")
        dirs = [cfg["llm"]] + cfg["slms"].split(",")
        names = ["llm"] + [f"slm{k + 1}" for k in range(len(dirs) - 1)]
        names = [n for n in names if not only or n in only]
        dirs = dict(zip(["llm"] + [f"slm{k + 1}" for k in range(len(dirs) - 1)], dirs))
        check_parties(cfg, names)
        check(cfg, {n: meta_model(dirs[n]) for n in names})  # the memory plan, before any weight is read
        loaded = {n: load_model(dirs[n], device=dev, dtype=base_dtype(cfg, n)) + (dict(path=dirs[n]),) for n in names}
    else:
        jobs = warm_jobs(cfg, splits, only)
        warm_dirs = {name: path for name, (path, _) in jobs.items()}
        loaded = {}
        for block in (False, True):  # first the parties no other process is warming up (same cache), then
            for name, (path, job) in jobs.items():  # wait for the others and load what they stored
                if name in loaded:
                    continue
                lock = lock_entry(path)
                if lock is None and block:
                    print(f"{name}: another process is warming it up ({path}); waiting for it", flush=True)
                    lock = lock_entry(path, block=True)
                if lock is not None:
                    with lock:
                        loaded[name] = warm_party(path, *job)
        loaded = {name: loaded[name] for name in jobs}  # the parties' order
        check_parties(cfg, list(loaded))
        check(cfg, {n: got[0] for n, got in loaded.items()}, strict=False)  # the memory plan of the rounds
    parties = {}
    for name, (model, tok, info) in loaded.items():
        k = 0 if name == "llm" else int(name[3:])  # slm<k>
        info.setdefault("params", n_params(model))
        if base_dtype(cfg, name) is not None and not cfg["llm"]:
            model.to(base_dtype(cfg, name))  # a LoRA party's frozen base: bf16 (the cache holds fp32)
        model = prepare(model, cfg, name)  # LoRA adapters and gradient checkpointing, where asked for
        if cfg["lora"]:
            info["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        local = with_solutions(splits["public"]) if name == "llm" else splits["clients"][k - 1]["private"]
        parties[name] = Party(name, model, tok, cfg, local, eval_sets(cfg, splits, name), splits["public"], info)
        parties[name].warm_dir = warm_dirs.get(name)
    return parties


def warm_jobs(cfg, splits, only=None) -> dict:
    """{name: (warm-up cache entry, warm_party's arguments)} of the zoo's parties (or the names in
    `only`), in the parties' order: what each warms up on, for how many steps, from which seed."""
    dev = cfg["device"]
    corpus = [p["question"] + "\n" + p["answer"] for p in splits["public"] + splits["general"]]
    jobs = {}  # name -> (cache entry, what warm_party needs)
    for i, (name, zoo, tok_spec) in enumerate(config.party_specs(cfg)):
        if only and name not in only:
            continue
        if name == "llm":
            warm_data, steps = with_solutions(splits["public"]) + splits["general"], cfg["warm_llm"]
        else:  # its private data, after --slm_pretrain solved problems of the shared domains (never pooled)
            pre = random.Random(cfg["data_seed"] * 100 + i).sample(splits["general"], min(cfg["slm_pretrain"], len(splits["general"])))
            warm_data, steps = pre + splits["clients"][i - 1]["private"], cfg["warm_slm"]
        seed = cfg["data_seed"] + (0 if SCENARIOS[cfg["scenario"]]["shared_init"] else i)  # homo: one initialization
        warm = dict(steps=steps, batch_size=cfg["warm_batch"], lr=cfg["warm_lr"], max_len=cfg["max_len"])
        path = party_cache_dir(cfg["cache"], name, zoo, tok_spec, corpus, warm_data, warm, seed)
        jobs[name] = (path, (name, zoo, tok_spec, corpus, warm_data, warm, seed, dev, cfg["rewarm"]))
    return jobs


def warm_party(path, name, zoo, tok_spec, corpus, warm_data, warm, seed, dev, rewarm=False):
    """(model, tokenizer, info) of a party of the zoo: read from its warm-up cache entry; else copied
    there from its shipped base (models.BASES; not with `rewarm`); else built, warmed up on warm_data
    and stored there (one rename: a cut run leaves no half entry). With `rewarm` an entry that is a
    copy of a shipped base is warmed up again; one a warm-up wrote is kept."""
    got = load_cached_party(path, device=dev)
    if got is not None and not (rewarm and got[2].get("base")):
        return got
    remove_temps(path)  # what a killed write of this entry left (this process holds the entry's lock)
    if not rewarm and (base := copy_base(path)) is not None:
        print(f"{name}: starts from its shipped base {base.parent.name}/{base.name} (--rewarm warms it up here instead)", flush=True)
        return load_cached_party(path, device=dev)
    model, tok = new_party(zoo, tok_spec, corpus, seed)
    t0, first = time.time(), []
    loss = warm_up(model, tok, warm_data, seed=seed, device=dev, desc=f"warm-up {name}", first=first, **warm)
    info = dict(params=n_params(model), warm_seconds=round(time.time() - t0, 1), warm_loss=loss, zoo=zoo,
                tokenizer=list(tok_spec), vocab=len(tok), first_losses=first)
    save_model(model, tok, path, info=info)
    return model, tok, dict(info, cached=False)


def set_counts(cfg, server, clients, frozen_llm):
    """--counts_from RUN/results.json: `random` allocates, per student and round, as many samples as
    that run's filter picked."""
    path = Path(cfg["counts_from"])
    try:
        rounds = json.loads(path.read_text())["rounds"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"--counts_from {path}: not a results.json of a run ({type(e).__name__}: {e})") from None
    sel = {r["round"]: r["selected"] for r in rounds}
    for rnd in range(1, cfg["rounds"] + 1):
        for c in clients:
            for side, party, key in [("down", c, (rnd, "down"))] + ([] if frozen_llm else [("up", server, (rnd, f"up/{c.name}"))]):
                n = sel.get(rnd, {}).get(f"{side}/{c.name}")
                if not isinstance(n, int):
                    raise ValueError(f"--counts_from {path}: no count of '{side}/{c.name}' in round {rnd}")
                party.counts[key] = n


def add_filters(cfg, parties: dict, clients: list[str]):
    """One LaDa filter per (client, direction), living with its student (spec §2): F_k^down with client k,
    F_k^up with the server (when the LLM learns); none for a method without filters."""
    if not uses_filter(cfg["method"]):
        return
    for name, p in parties.items():
        if name != "llm":
            p.filters["down"] = new_filter(cfg, clients.index(name), "down")
        elif SCENARIOS[cfg["scenario"]]["llm_learns"]:
            p.filters.update({f"up/{n}": new_filter(cfg, k, "up") for k, n in enumerate(clients)})


def build_some(cfg, names) -> dict:
    """The parties in `names` with their filters, built exactly as a whole run builds them (same data,
    seeds, cache): what one process of a Flower federation holds."""
    splits = make_data(cfg, n_clients(cfg))
    with autocast(cfg["device"], cfg["dtype"]):
        got = build_parties(cfg, splits, only=names)
    add_filters(cfg, got, [f"slm{k + 1}" for k in range(n_clients(cfg))])
    return got


def new_filter(cfg, k, direction):
    """The LaDa filter of client k (0-based) for `direction`: "down" (F_k^down, lives with client k)
    or "up" (F_k^up, lives with the server); its seed is fixed by (seed, k, direction)."""
    budget = cfg["plugin_budget"] if cfg["method"] in PLUGIN else cfg["budget"]  # v2 picks A_k within H_k
    return LearnabilityFilter(FEATURE_DIM, cfg["embed_dim"], budget, cfg["min_budget"], cfg["threshold"],
                              epochs=cfg["filter_epochs"], seed=cfg["seed"] * 100 + 2 * k + (direction == "up"),
                              reward_scale="q90", optimism=cfg["filter_optimism"])


def eval_sets(cfg, splits, name) -> dict:
    """{key: examples} a party is scored on: its test set (its validation set with --eval_split val);
    the LLM also on the private-only domains where the testbed has them (key "llm-private")."""
    part = cfg["eval_split"]
    if name != "llm":
        return {name: splits["clients"][int(name[3:]) - 1][part]}
    private = splits.get(f"public_{part}_private")
    return {"llm": splits[f"public_{part}"], **({"llm-private": private} if private else {})}
