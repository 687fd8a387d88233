"""federated.py: LaDa's federated loop (spec §2) and the command line.

    python federated.py --scenario hetero                    # GPU sizes on a GPU; without one, the CPU preset
    python federated.py --scenario hetero --smoke            # the whole loop on CPU in about a minute
    python federated.py --scenario hetero --preset cpu       # reduced sizes that learn on a CPU
    python federated.py --scenario hetero --preset default   # the GPU sizes, wherever it runs
    python federated.py --scenario homo --method fedmkt      # a baseline (local, fedmkt, random, ...)
    python federated.py --llm DIR --slms DIR,DIR --data gsm8k:PATH   # local checkpoints, real data
    python federated.py --llm DIR --slms DIR,DIR --data gsm8k:PATH --lora 16 --grad_ckpt --max_len 512  # 7B on one GPU
    python federated.py --scenario hetero --smoke --resume   # continue an interrupted run (same flags)

One loop serves every scenario and method (the two tables of spec §2): a method is a choice of
allocation (none, fedmkt's rule, random, the LaDa filter, all) and of loss (sft, dard). Each step of
the round is a function of its side in protocol.py (server_* or client_*) whose inputs and outputs
are the messages of protocol.SCHEMA; `run` calls them in order.
Writes into --out: log.jsonl (one line per round), results.json, results.md, accuracy.png
(with matplotlib), and ckpt/ (the last finished round, written atomically).
"""
import argparse
import json
import math
import os
import random
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

import protocol as P
from lora import LORA_FLAGS, LORA_HELP
from protocol import METHODS

# -----------------------------------------------------------------------------
# Presets: plain dicts; flags override them. Sizes: see models.ZOO.

BASE = dict(
    rounds=5, pool_size=256, budget=64, min_budget=8, threshold=0.5, filter_epochs=10, filter_optimism=0.0,
    embed_dim=16,
    alpha=0.1, lam=0.5, beta=0.1, tau=0.1,                  # spec §4 defaults (v1; v2's alpha: METHOD_DEFAULTS)
    gamma=1.0, eps=0.1, plugin_budget=64,                   # spec §4': LaDa v2's plug-in
    local_steps=50, local_batch=32, distill_epochs=2, distill_batch=16, lr=3e-4, lr_llm=3e-4,  # 0.1 x warm_lr
    distill_lr_scale=1.0,  # each party's lr times this during distillation (spec §2 step 6); local steps keep lr
    local_lr_scale=1.0,  # each party's lr times this during its local step (spec §2 step 1)
    gen_temperature=0.7, max_new_tokens=320, max_len=1024, eval_batch=512, score_batch=256,
    # data (spec §1, §6): generated testbed sizes
    n_public=4000, n_private=3000, n_val=200, n_test=500, n_general=20000, dirichlet=0.5,
    min_steps=2, max_steps=5, max_value=100,
    private_only="", private_only_share=0.3,  # the testbed's knowledge split (data.make_splits); "" = none
    eval_subset=0, counts_from="", eval_split="test", grading="flexible", slm_pretrain=0,  # evaluate rounds before the last on the first N test problems (0 = all); see `allocate`
    warm_llm=6000, warm_slm=1500, warm_batch=64, warm_lr=3e-3,
    parties="gpu", seed=0, data_seed=-1, device="auto", dtype="auto", cache="cache",
)
BASE.update(LORA_FLAGS)  # --lora, --lora_alpha, --lora_dropout, --lora_targets, --lora_parties, --grad_ckpt (lora.py)
PRESETS = {
    "default": dict(),
    "cpu": dict(parties="cpu", rounds=4, pool_size=64, budget=16, min_budget=4, local_steps=10, local_batch=32,
                n_public=2000, n_private=1500, n_test=100, n_val=50, n_general=6000, min_steps=2, max_steps=3,
                max_value=30, warm_llm=1200, warm_slm=400, warm_batch=32, max_new_tokens=160,
                eval_batch=128, score_batch=128),
    # the testbed of the comparison (README "The testbed"): scarce private data, a domain only the clients
    # know, 1-3-step problems the SLMs learn in part, a budget of an eighth of the pool
    "testbed": dict(parties="testbed", rounds=5, pool_size=256, budget=16, min_budget=4, local_steps=10, local_batch=32,
                    distill_epochs=8,
                    lr=1e-3, n_public=3000, n_private=100, n_test=500, n_val=200, n_general=6000, min_steps=1,
                    max_steps=3, max_value=12, private_only="time", private_only_share=0.3, warm_llm=1200,
                    warm_slm=400, warm_batch=32, max_new_tokens=256, eval_subset=100, eval_batch=128, score_batch=128,
                    grading="checked", slm_pretrain=1000),
    "smoke": dict(parties="smoke", rounds=2, pool_size=16, budget=6, min_budget=2, local_steps=3, local_batch=8,
                  distill_epochs=1, distill_batch=8, n_public=200, n_private=100, n_test=24, n_val=10,
                  n_general=200, min_steps=2, max_steps=2, max_value=20, warm_llm=60, warm_slm=30, warm_batch=16,
                  max_new_tokens=64, filter_epochs=3),
}
# party sizes: (zoo name, tokenizer); hetero SLMs differ in architecture, size and tokenizer
PARTIES = {
    "gpu": dict(llm=("llama-26m", ("bpe", 2048)), mid=("llama-8m", ("bpe", 2048)),
                hetero=[("qwen2-3m", ("bpe", 640)), ("gpt2-2m", ("bpe", 400)), ("llama-1m", ("char",))]),
    "cpu": dict(llm=("llama-cpu-l", ("bpe", 1024)), mid=("llama-cpu-m", ("bpe", 1024)),
                hetero=[("qwen2-cpu-s", ("bpe", 384)), ("gpt2-cpu-s", ("bpe", 320)), ("llama-cpu-s", ("char",))]),
    "testbed": dict(llm=("llama-cpu-l", ("bpe", 1024)), mid=("llama-cpu-m", ("bpe", 1024)),
                    hetero=[("qwen2-tb", ("bpe", 384)), ("gpt2-tb", ("bpe", 320)), ("llama-tb", ("char",))]),
    "smoke": dict(llm=("llama-tiny", ("bpe", 300)), mid=("llama-tiny", ("bpe", 300)),
                  hetero=[("qwen2-tiny", ("bpe", 280)), ("gpt2-tiny", ("bpe", 260)), ("llama-tiny", ("char",))]),
}
# a method's own defaults, between the preset and the flags: DARD v2's alpha (spec §4')
METHOD_DEFAULTS = {m: dict(alpha=1.0) for m in P.PLUGIN}
SCENARIOS = ("hetero", "homo", "one2one", "llm2slm")
RUN_KEYS = ("out", "resume", "rounds")  # flags that do not change the finished rounds (--rounds extends a run)


def resolve_config(args) -> dict:
    cfg = dict(BASE, **PRESETS["smoke" if args.smoke else args.preset], **METHOD_DEFAULTS.get(args.method, {}))
    cfg.update(scenario=args.scenario, method=args.method, llm=args.llm, slms=args.slms, data=args.data,
               llm_size=args.llm_size)
    for k in BASE:  # every BASE key is also a flag (None = keep the preset)
        v = getattr(args, k, None)
        if v is not None:
            cfg[k] = v
    if cfg["data_seed"] == -1:  # data, initializations and warm-ups follow --seed unless fixed apart
        cfg["data_seed"] = cfg["seed"]
    if cfg["device"] == "auto":
        cfg["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    if cfg["dtype"] == "auto":  # bf16 autocast for real checkpoints on a GPU; fp32 (TF32 on CUDA) otherwise:
        # the built-in parties learned far less and stepped 5x slower under bf16 on an H200 (README, "On a GPU")
        cfg["dtype"] = "bf16" if cfg["device"].startswith("cuda") and (cfg["llm"] or cfg["slms"]) else "fp32"
    if cfg["dtype"] not in ("fp32", "bf16"):
        raise ValueError(f"--dtype must be auto, fp32 or bf16, got {cfg['dtype']!r}")
    if cfg["method"] == "fedavg" and cfg["scenario"] != "homo":
        raise ValueError("--method fedavg needs --scenario homo (only SLMs of one architecture can average weights)")
    if cfg["counts_from"] and (cfg["method"] not in ("random", "lada-random") or not Path(cfg["counts_from"]).is_file()):
        raise ValueError(f"--counts_from {cfg['counts_from']}: needs --method random or lada-random and a results.json of a run")
    from eval import MODES
    if cfg["grading"] not in MODES:
        raise ValueError(f"--grading must be one of {', '.join(MODES)}, got {cfg['grading']!r}")
    if cfg["eval_split"] not in ("test", "val"):
        raise ValueError(f"--eval_split must be test or val, got {cfg['eval_split']!r}")
    if not 0.0 <= cfg["filter_optimism"] <= 1.0:
        raise ValueError(f"--filter_optimism must be in [0, 1], got {cfg['filter_optimism']}")
    cfg["stop_at_answer_line"] = bool(cfg["llm"])  # checkpoints trained elsewhere may not end a path with EOS
    check_config(cfg)  # ranges first: a --lora -1 is wrong with or without peft
    if cfg["lora"]:  # one line now, not a traceback once the models are loaded
        from lora import require_peft
        require_peft()
    return cfg


# What each numeric flag may be; a numeric flag not listed here must be a finite number >= 0
RANGES = dict(rounds=">= 1", pool_size=">= 1", budget=">= 1", min_budget=">= 1", threshold="in [0, 1]",
              filter_epochs=">= 1", filter_optimism="in [0, 1]", plugin_budget=">= 1", eps="in [0, 1]", embed_dim=">= 1", beta="> 0", tau="> 0",
              local_batch=">= 1", distill_epochs=">= 1", distill_batch=">= 1", lr="> 0", lr_llm="> 0", distill_lr_scale="> 0",
              local_lr_scale="> 0",
              max_new_tokens=">= 1", max_len=">= 16", eval_batch=">= 1", score_batch=">= 1", n_public=">= 1",
              n_private=">= 1", n_test=">= 1", dirichlet="> 0", min_steps=">= 1", max_steps=">= 1", max_value=">= 10",
              warm_llm=">= 1", warm_slm=">= 1", warm_batch=">= 1", warm_lr="> 0", seed="in [0, 2**32)",
              data_seed="in [-1, 2**32)", private_only_share="in [0, 1]")
RULES = {">= 0": lambda v: v >= 0, ">= 1": lambda v: v >= 1, ">= 10": lambda v: v >= 10, ">= 16": lambda v: v >= 16,
         "> 0": lambda v: v > 0, "in [0, 1]": lambda v: 0 <= v <= 1, "in [0, 2**32)": lambda v: 0 <= v < 2**32,
         "in [-1, 2**32)": lambda v: -1 <= v < 2**32}


def check_config(cfg):
    """ValueError (one line naming the flag) for a value no run can use: out of RANGES, not finite,
    min_budget > budget, min_steps > max_steps, an unknown device, dtype or party set, a path that is a file."""
    for k, v in BASE.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):  # switches (e.g. --grad_ckpt) are not numbers
            x, rule = cfg[k], RANGES.get(k, ">= 0")
            if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or not RULES[rule](x):
                raise ValueError(f"--{k} must be {'a finite number ' if isinstance(v, float) else 'an integer '}{rule}, got {x!r}")
    for lo, hi in (("min_budget", "budget"), ("min_steps", "max_steps")) + ((("min_budget", "plugin_budget"),)
                                                                          if cfg["method"] in P.PLUGIN else ()):
        if cfg[lo] > cfg[hi]:
            raise ValueError(f"--{lo} {cfg[lo]} is larger than --{hi} {cfg[hi]}")
    if cfg["parties"] not in PARTIES:
        raise ValueError(f"--parties must be one of {', '.join(PARTIES)}, got {cfg['parties']!r}")
    dev = cfg["device"]
    if not (dev == "cpu" or dev == "cuda" or dev.startswith("cuda:") and dev[5:].isdigit()):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {dev!r}")
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {dev} asks for a GPU, but CUDA is not available here")
    if Path(cfg["cache"]).exists() and not Path(cfg["cache"]).is_dir():
        raise ValueError(f"--cache {cfg['cache']} is a file, not a directory")
    if cfg["slms"] is not None and not all(d.strip() for d in cfg["slms"].split(",")):
        raise ValueError(f"--slms {cfg['slms']!r} has an empty entry")


# What a run takes where no GPU is found (measured: README "What to expect")
CPU_MINUTES = {"cpu": "about 10 minutes on a 2-core CPU, 2 once its warmed-up models are cached",
               "default": "days on a CPU (it is sized for one GPU)"}


# -----------------------------------------------------------------------------
# Parties and data

def make_data(cfg, num_clients):
    """Public pool and per-client data: generated (spec §6), or split from --data (IID shards)."""
    import data

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


def party_specs(cfg):
    """[(name, zoo name, tokenizer spec)] for the LLM and the scenario's SLMs."""
    sizes = PARTIES[cfg["parties"]]
    llm = sizes["mid"] if cfg["llm_size"] == "mid" else sizes["llm"]
    slms = {"hetero": sizes["hetero"], "llm2slm": sizes["hetero"], "homo": [sizes["hetero"][0]] * 3,
            "one2one": sizes["hetero"][-1:]}[cfg["scenario"]]
    return [("llm",) + llm] + [(f"slm{k + 1}",) + s for k, s in enumerate(slms)]


class Party:
    """One party of spec §2: its model, tokenizer and optimizer, its local data (tokenized once), its
    evaluation sets ({key: examples}, `eval_sets`), and the filters that live with it (each filter lives with its student). `state` holds
    what the party computed this round and keeps to itself (its own paths and their scores)."""

    def __init__(self, name, model, tok, cfg, local, evals, public, info):
        from distill import TokenizedSet, make_optimizer

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
    from data import with_solutions
    from lora import base_dtype, check_parties, prepare
    from memory import check, meta_model
    from models import load_model, lock_entry, n_params

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
    from data import with_solutions
    from models import party_cache_dir

    dev = cfg["device"]
    corpus = [p["question"] + "\n" + p["answer"] for p in splits["public"] + splits["general"]]
    jobs = {}  # name -> (cache entry, what warm_party needs)
    for i, (name, zoo, tok_spec) in enumerate(party_specs(cfg)):
        if only and name not in only:
            continue
        if name == "llm":
            warm_data, steps = with_solutions(splits["public"]) + splits["general"], cfg["warm_llm"]
        else:  # its private data, after --slm_pretrain solved problems of the shared domains (never pooled)
            pre = random.Random(cfg["data_seed"] * 100 + i).sample(splits["general"], min(cfg["slm_pretrain"], len(splits["general"])))
            warm_data, steps = pre + splits["clients"][i - 1]["private"], cfg["warm_slm"]
        seed = cfg["data_seed"] + (0 if cfg["scenario"] == "homo" else i)  # homo SLMs share an initialization
        warm = dict(steps=steps, batch_size=cfg["warm_batch"], lr=cfg["warm_lr"], max_len=cfg["max_len"])
        path = party_cache_dir(cfg["cache"], name, zoo, tok_spec, corpus, warm_data, warm, seed)
        jobs[name] = (path, (name, zoo, tok_spec, corpus, warm_data, warm, seed, dev))
    return jobs


def warm_party(path, name, zoo, tok_spec, corpus, warm_data, warm, seed, dev):
    """(model, tokenizer, info) of a party of the zoo: read from its warm-up cache entry, or built,
    warmed up on warm_data and stored there (one rename: a cut run leaves no half entry)."""
    from distill import warm_up
    from models import load_cached_party, new_party, n_params, save_model

    got = load_cached_party(path, device=dev)
    if got is not None:
        return got
    model, tok = new_party(zoo, tok_spec, corpus, seed)
    t0 = time.time()
    loss = warm_up(model, tok, warm_data, seed=seed, device=dev, desc=f"warm-up {name}", **warm)
    info = dict(params=n_params(model), warm_seconds=round(time.time() - t0, 1), warm_loss=loss, zoo=zoo,
                tokenizer=list(tok_spec), vocab=len(tok))
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


def average(state_dicts):
    """The entrywise mean of the SLMs' weights (float32)."""
    with torch.no_grad():
        return {k: torch.stack([sd[k].float() for sd in state_dicts]).mean(0) for k in state_dicts[0]}


def fedavg(models, names):
    """Average the SLMs' weights in place (FedMKT's homogeneous setting)."""
    from lora import is_lora

    first = models[names[0]]  # LoRA parties average their adapters; their frozen bases stay as loaded
    keys = [k for k, p in first.named_parameters() if p.requires_grad] if is_lora(first) else list(first.state_dict())
    with torch.no_grad():
        avg = average([{k: models[n].state_dict()[k] for k in keys} for n in names])
        for n in names:
            models[n].load_state_dict({k: v.to(models[n].state_dict()[k].dtype) for k, v in avg.items()},
                                      strict=not is_lora(first))


# -----------------------------------------------------------------------------
# Checkpoints: the last finished round, atomically; --resume continues from it

def save_checkpoint(out, cfg, rnd, models, toks, opts, filters, results):
    """Everything needed to continue after round `rnd`: weights (safetensors), optimizer and filter
    states (models.save_state: safetensors + JSON, no pickle), results and config. Written into a
    temporary directory, then published in one step: out/ckpt becomes a link to out/ckpt.rNNNN
    (models.commit_link), so out/ckpt is always a whole round, however the process dies."""
    from models import atomic_dir, commit_link, crash_point, save_state

    tmp = atomic_dir(out / "ckpt")
    for n, m in models.items():
        m.save_pretrained(str(tmp / n), safe_serialization=True)
        toks[n].save_pretrained(str(tmp / n))
    crash_point("checkpoint")  # weights written, states not yet
    save_state({"round": rnd, "opts": {n: o.state_dict() for n, o in opts.items()},
                "filters": {k: f.state_dict() for k, f in filters.items()}}, tmp / "state")
    (tmp / "results.json").write_text(json.dumps(results, indent=1))
    (tmp / "config.json").write_text(json.dumps(cfg, indent=1))
    commit_link(tmp, out / "ckpt", f"r{rnd:04d}")


def _read_json(path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path}: missing") from None
    except (ValueError, RecursionError) as e:
        raise ValueError(f"{path}: not valid JSON ({str(e).splitlines()[0][:100]})") from None


def load_checkpoint(out, cfg, models, opts, filters):
    """Restore the last finished round; refuse a checkpoint made with a different config, and any
    file that is not what save_checkpoint writes (one line naming it). Nothing is unpickled."""
    from lora import is_lora, load_adapters
    from models import StateError, load_model, load_state, remove_stale

    ck = out / "ckpt"
    if not ck.is_dir():
        raise ValueError(f"{ck}: not a checkpoint directory (a link to a missing one?)")
    if ck.is_symlink():
        remove_stale(ck)  # what a killed save left: never loaded
    if (ck / "state.pt").exists():
        raise StateError(f"{ck / 'state.pt'}: a pickled state (written by an older version); it is not loaded, "
                         "since unpickling can run code: continue with that version or start a new --out")
    saved = _read_json(ck / "config.json")
    if not isinstance(saved, dict):
        raise StateError(f"{ck / 'config.json'}: not an object")
    saved = {**{k: v for k, v in BASE.items() if k not in saved}, **saved}  # keys added since: their defaults
    # a flag added after the checkpoint was written counts at its default there
    diff = sorted(k for k in set(saved) | set(cfg) if k not in RUN_KEYS and saved.get(k, BASE.get(k)) != cfg.get(k))
    if diff:
        raise ValueError(f"{ck} was made with a different config ({', '.join(f'{k}={saved.get(k)!r}' for k in diff)}); "
                         "use another --out or the same flags")
    results = _read_json(ck / "results.json")
    state = load_state(ck / "state")
    for n in models:
        if is_lora(models[n]):  # the adapters (safetensors); the frozen base is as loaded
            load_adapters(models[n], ck / n)
            continue
        m, _ = load_model(ck / n, device=cfg["device"])
        try:
            models[n].load_state_dict(m.state_dict())
        except RuntimeError as e:
            raise StateError(f"{ck / n}: does not fit this run's {n} ({str(e).splitlines()[0][:120]})") from None
    try:  # whatever a damaged or crafted state trips over in the libraries' loaders: one line
        rnd = state["round"]
        if not isinstance(results, dict):
            raise ValueError("results.json is not an object")
        got = len(results["rounds"]) if "rounds" in results else results.get("round")  # a Flower client's: {"round", ...}
        if not isinstance(rnd, int) or got != rnd:
            raise ValueError("round number and results disagree")
        for n, o in opts.items():
            o.load_state_dict(state["opts"][n])
        for k, f in filters.items():
            f.load_state_dict(state["filters"][k])
    except Exception as e:
        raise StateError(f"{ck / 'state.json'}: does not fit this run ({type(e).__name__}: {str(e)[:120]})") from None
    return rnd, results


def write_report(out, results):
    """results.json (atomic), results.md (a table a person reads at a glance), accuracy.png."""
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1))
    os.replace(tmp, out / "results.json")
    rows = [("0 (warm-up)", results["initial"])] + [(str(r["round"]), r["accuracy"]) for r in results["rounds"]]
    names = list(results["initial"])
    md = ["| round | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    md += ["| " + r + " | " + " | ".join(f"{100 * a.get(n, float('nan')):.1f}" for n in names) + " |" for r, a in rows]
    (out / "results.md").write_text("\n".join(md) + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "\n".join(md)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for n in names:
        ax.plot(range(len(rows)), [100 * a.get(n, float("nan")) for _, a in rows], marker="o", label=n)
    ax.set(xlabel="round", ylabel="accuracy (%)", title=f"{results['config']['scenario']} / {results['config']['method']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=120)
    plt.close(fig)
    return "\n".join(md)


# -----------------------------------------------------------------------------
# The run: data and parties, then `for rnd in range(rounds)`, the steps of spec §2 in order

@contextmanager
def phase(times: dict, name: str, dev: str):
    """Add the seconds of a `with` block to times[name] (the GPU's queue drained first, so a phase is
    charged for its own kernels; one sync per phase)."""
    t0 = time.time()
    try:
        yield
    finally:  # a failing step is charged too
        if dev.startswith("cuda"):
            torch.cuda.synchronize()
        times[name] = round(times.get(name, 0.0) + time.time() - t0, 2)


def new_filter(cfg, k, direction):
    """The LaDa filter of client k (0-based) for `direction`: "down" (F_k^down, lives with client k)
    or "up" (F_k^up, lives with the server); its seed is fixed by (seed, k, direction)."""
    from filter import FEATURE_DIM, LearnabilityFilter

    budget = cfg["plugin_budget"] if cfg["method"] in P.PLUGIN else cfg["budget"]  # v2 picks A_k within H_k
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


def evaluate(cfg, party, rnd) -> dict:
    """Greedy accuracy of the party's model on each of its evaluation sets: {"accuracy", "strict",
    "eval_n", "correct"}, each {key: value}. Rounds before the last read the first eval_subset
    problems; round 0 and the last read all, and give each problem's 0/1 (a string, "correct") for
    paired comparisons."""
    import eval as ev

    full = rnd in (0, cfg["rounds"]) or cfg["eval_subset"] <= 0
    out = {"accuracy": {}, "strict": {}, "eval_n": {}, "correct": {}}
    for key, examples in party.evals.items():
        examples = examples if full else examples[:cfg["eval_subset"]]
        r = ev.evaluate(party.model, party.tok, examples, batch_size=cfg["eval_batch"],
                        max_new_tokens=cfg["max_new_tokens"], device=cfg["device"],
                        stop_at_answer_line=cfg["stop_at_answer_line"])
        out["accuracy"][key], out["strict"][key], out["eval_n"][key] = r[cfg["grading"]], r["strict"], len(examples)
        if full:
            out["correct"][key] = "".join("01"[hit] for hit in r["correct"][cfg["grading"]])
    return out


def initial_evaluation(cfg, party) -> dict:
    """evaluate(cfg, party, 0), kept in the party's warm-up cache entry: the runs of a grid that start
    from the same warmed-up model and score the same sets the same way read it instead of generating
    again (greedy decoding of a fixed model: the same answers). The key holds the sets, every setting
    that reaches generation or grading, the source of eval.py and the library versions."""
    import transformers

    import eval as ev
    from models import fingerprint

    if party.warm_dir is None:
        return evaluate(cfg, party, 0)
    keys = ("max_new_tokens", "eval_batch", "grading", "stop_at_answer_line", "dtype", "lora", "lora_parties")
    key = fingerprint({k: cfg[k] for k in keys}, torch.device(cfg["device"]).type, torch.__version__,
                      transformers.__version__, Path(ev.__file__).read_text(),
                      {k: [e["question"] + e["answer"] for e in v] for k, v in party.evals.items()})
    path = Path(party.warm_dir) / f"eval0-{key}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        pass
    got = evaluate(cfg, party, 0)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(got))
        os.replace(tmp, path)
    except OSError:  # a read-only cache still runs
        tmp.unlink(missing_ok=True)
    return got


def merge_evaluations(evs) -> dict:
    merged = {"accuracy": {}, "strict": {}, "eval_n": {}, "correct": {}}
    for e in evs:
        for k in merged:
            merged[k].update(e[k])
    return merged


def open_run(cfg):
    """The output directory (a finished round there needs --resume), the config printed first, the
    seed and the device settings. Returns (out, amp): amp is the autocast context of cfg's dtype."""
    from distill import autocast

    out = Path(cfg["out"])
    has_ckpt = (out / "ckpt").is_symlink() or (out / "ckpt").exists()
    if has_ckpt and not cfg["resume"]:
        raise ValueError(f"{out} already holds a run; add --resume to continue it, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    print(json.dumps(cfg), flush=True)
    torch.manual_seed(cfg["seed"])
    if cfg["device"].startswith("cuda"):  # TF32 wherever fp32 matmuls remain (the optimizer's master weights stay fp32)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return out, autocast(cfg["device"], cfg["dtype"])  # under bf16: warm-up, local steps, distillation, scoring, generation


def new_results(cfg, infos, ev0, setup_times):
    return {"config": cfg, "parties": infos, "initial": ev0["accuracy"], "initial_strict": ev0["strict"],
            "initial_correct": ev0["correct"], "seconds": setup_times, "rounds": []}


def show_start(out, results):
    """log.jsonl as far as the run got, and what the parties are."""
    (out / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in results["rounds"]))
    print("parties:", json.dumps(results["parties"]))
    print("after warm-up:", {n: round(a, 3) for n, a in results["initial"].items()}, flush=True)


def end_round(out, cfg, results, entry, save, start, t_rounds):
    """A round's bookkeeping after its evaluation: the checkpoint (save()), log.jsonl, the report and
    the progress line."""
    rnd = entry["round"]
    results["rounds"].append(entry)
    with phase(entry["phases"], "checkpoint", cfg["device"]):
        save()
    with open(out / "log.jsonl", "a") as f:
        f.write(json.dumps(entry) + "\n")
    write_report(out, results)
    eta = (time.time() - t_rounds) / (rnd - start) * (cfg["rounds"] - rnd)
    print(f"round {rnd}/{cfg['rounds']} ({entry['seconds']}s, ETA {eta:.0f}s) accuracy",
          {n: round(a, 3) for n, a in entry["accuracy"].items()}, "selected", entry["selected"],
          "MB", {d: round(b / 1e6, 3) for d, b in entry["bytes"].items()}, flush=True)
    for w in entry.get("warnings", []):
        print(f"round {rnd}: warning: {w}", flush=True)


def round_entry(rnd, ev, selected, rewards, losses, traffic, errors, t0, times, plugin=None):
    entry = {"round": rnd, "accuracy": ev["accuracy"], "strict": ev["strict"], "eval_n": ev["eval_n"],
             "correct": ev["correct"], "selected": selected, "reward": rewards,
             "loss": {k: v for k, v in losses.items() if not (isinstance(v, float) and math.isnan(v))},
             "bytes": traffic, "errors": errors, "seconds": round(time.time() - t0, 1), "phases": times}
    if plugin:  # v2 (spec §4'): per student and direction |H_k|, |A_k|, pairs by kind, Δ log p per token
        entry["plugin"] = plugin
        entry["warnings"] = [f"{k}: y+ fell below pi_ref ({d['dlogp_pos']:+.4f} nats/token; DPOP's failure mode)"
                             for k, d in plugin.items() if (d.get("dlogp_pos") or 0.0) < 0]
    return entry


def run(cfg):
    from models import crash_point

    out, amp = open_run(cfg)
    dev = cfg["device"]
    alloc, _ = METHODS[cfg["method"]]
    frozen_llm = cfg["scenario"] == "llm2slm"  # only the LLM -> SLM direction
    setup_times = {}

    # --- data and parties (spec §1, §6)
    n_slm = len(party_specs(cfg)) - 1 if not cfg["slms"] else len(cfg["slms"].split(","))
    splits = make_data(cfg, n_slm)
    with amp, phase(setup_times, "warm-up", dev):
        parties = build_parties(cfg, splits)
    server, clients = parties["llm"], [p for n, p in parties.items() if n != "llm"]
    if P.uses_filter(cfg["method"]):  # one filter per (client, direction), living with the student (spec §2)
        for k, c in enumerate(clients):
            c.filters["down"] = new_filter(cfg, k, "down")
            if not frozen_llm:
                server.filters[f"up/{c.name}"] = new_filter(cfg, k, "up")
    if cfg["counts_from"]:  # random at the counts another run's filter picked (same student, round)
        set_counts(cfg, server, clients, frozen_llm)
    # the checkpoint's view of every party's state
    models = {n: p.model for n, p in parties.items()}
    toks = {n: p.tok for n, p in parties.items()}
    opts = {n: p.opt for n, p in parties.items()}
    filters = {**{f"down/{c.name}": c.filters["down"] for c in clients if "down" in c.filters},
               **server.filters}


    start = 0
    if cfg["resume"] and ((out / "ckpt").is_symlink() or (out / "ckpt").exists()):
        start, results = load_checkpoint(out, cfg, models, opts, filters)
        print(f"resuming after round {start}")
    else:
        with phase(setup_times, "evaluation", dev):
            ev0 = merge_evaluations(initial_evaluation(cfg, p) for p in parties.values())
        results = new_results(cfg, {n: p.info for n, p in parties.items()}, ev0, setup_times)
    show_start(out, results)

    t_rounds = time.time()
    for rnd in range(start + 1, cfg["rounds"] + 1):
        t0 = time.time()
        rng = {n: random.Random(f"{cfg['seed']}-{rnd}-{n}") for n in parties}  # each party's own randomness
        torch.manual_seed(cfg["seed"] * 1000 + rnd)
        traffic, selected, rewards, losses, errors, times, plugin = {}, {}, {}, {}, {}, {}, {}
        with amp:
            # --- 1. local step: every party on its own data (the frozen LLM of llm2slm excepted)
            with phase(times, "local", dev):
                for n, p in parties.items():
                    if not (n == "llm" and frozen_llm):
                        losses[f"local/{n}"] = P.local_step(p, cfg, rng[n])
            if cfg["scenario"] == "homo" and cfg["method"] != "local":  # FedAvg of the SLMs, after the local step
                with phase(times, "fedavg", dev):
                    for c in clients:
                        P.send({"state_dict": c.model.state_dict()}, "weights", traffic, "up")
                    fedavg(models, [c.name for c in clients])
                    for c in clients:
                        P.send({"state_dict": c.model.state_dict()}, "weights", traffic, "down")

            if alloc is not None:
                with phase(times, "2 server_offer", dev):
                    offer = P.server_offer(server, cfg, rnd, rng["llm"])
                for k, c in enumerate(clients):
                    try:  # a failing client (or a refused message) is logged and skipped; the round goes on
                        msg = P.receive(P.send(offer, "pool", traffic, "down"), "pool", min(cfg["pool_size"], len(c.public)),
                                        cfg, c.gold)
                        with phase(times, "3 client_answer", dev):
                            reply = P.send(P.client_answer(c, msg, cfg, rnd, k), "client_paths", traffic, "up")
                        reply = P.receive(reply, "client_paths", len(server.state["qs"]), cfg)
                        crash_point("round")
                        with phase(times, "4 server_score", dev):
                            score_msg = P.send(P.server_score(server, c.name, reply, cfg), "llm_score", traffic, "down")
                        score_msg = P.receive(score_msg, "llm_score", len(msg["questions"]), cfg)
                        with phase(times, "5-7 client_learn", dev):
                            got = P.client_learn(c, msg, score_msg, cfg, rng[c.name])
                        selected[f"down/{c.name}"] = got["selected"]
                        if "plugin" in got:
                            plugin[f"down/{c.name}"] = got["plugin"]
                        losses.update({f"{key}/{c.name}": v for key, v in got["losses"].items()})
                        if got["reward"] is not None:
                            rewards[f"down/{c.name}"] = got["reward"]
                        if not frozen_llm:
                            with phase(times, "5' server_pick", dev):
                                selected[f"up/{c.name}"] = len(P.server_pick(server, c.name, cfg, rng["llm"]))
                    except Exception as e:
                        errors[c.name] = f"{type(e).__name__}: {e}"
                        print(f"round {rnd}: client {c.name} failed and is skipped ({errors[c.name]})", file=sys.stderr)
                if not frozen_llm:
                    with phase(times, "6'-7' server_learn", dev):
                        got = P.server_learn(server, cfg, rng["llm"])
                    losses.update({f"{key}/llm": v for key, v in got["losses"].items()})
                    rewards.update({f"up/{n}": r for n, r in got["rewards"].items()})
                    plugin.update(got.get("plugin", {}))

        # --- evaluation, log, checkpoint
        with phase(times, "evaluation", dev):
            ev = merge_evaluations(evaluate(cfg, p, rnd) for p in parties.values())
        entry = round_entry(rnd, ev, selected, rewards, losses, traffic, errors, t0, times, plugin)
        end_round(out, cfg, results, entry, lambda: save_checkpoint(out, cfg, rnd, models, toks, opts, filters, results),
                  start, t_rounds)
    print(write_report(out, results))
    return results


# -----------------------------------------------------------------------------
# Command line

HELP = {
    "rounds": "communication rounds T", "pool_size": "public questions drawn per round (|P|)",
    "budget": "most samples a filter (or random) allocates per round", "min_budget": "fewest samples a filter allocates",
    "threshold": "filter score u(x) needed to be picked", "filter_epochs": "epochs of filter training per round",
    "filter_optimism": "residual target of passed-over samples for the exploration net, 0 = spec §3.2 (filter.py)",
    "embed_dim": "sample embedding size of the filter context",
    "alpha": "weight of the NLL(y+) term (spec §4; v2's lada methods default to 1.0, spec §4')",
    "gamma": "weight of the plug-in's loss on A_k beside the host's on H_k (v2, spec §4')",
    "eps": "DARD v2's label smoothing: contrast target 1 - eps (spec §4')",
    "plugin_budget": "most samples the v2 plug-in picks within the host's allocation per student and round (spec §4')",
    "lam": "weight of the local SFT anchor L_local (spec §4)", "beta": "DPO-like temperature beta (spec §4)",
    "tau": "teacher-margin temperature, nats per character (spec §4)", "local_steps": "local SFT steps per round",
    "local_batch": "local SFT batch size", "distill_epochs": "passes over the allocated samples",
    "distill_batch": "pairs per distillation step", "lr": "SLM learning rate (AdamW)", "lr_llm": "LLM learning rate",
    "distill_lr_scale": "each party's learning rate is multiplied by this during distillation (local steps keep theirs)",
    "local_lr_scale": "each party's learning rate is multiplied by this during its local step (distillation keeps its own)",
    "gen_temperature": "sampling temperature of the exchanged paths", "max_new_tokens": "tokens per generated path",
    "max_len": "longest training sequence in tokens (prompt + path + EOS); longer ones are left out and counted, never cut",
    "n_public": "public pool size", "n_private": "private examples per client", "n_val": "validation examples per party",
    "n_test": "test examples per party", "n_general": "extra general data for the LLM warm-up",
    "dirichlet": "Dirichlet alpha of the clients' domain mixes (smaller = more non-IID)",
    "min_steps": "fewest reasoning steps of a generated problem", "max_steps": "most reasoning steps",
    "max_value": "size of the numbers in generated problems", "warm_llm": "LLM warm-up steps",
    "warm_slm": "SLM warm-up steps", "warm_batch": "warm-up batch size", "warm_lr": "warm-up learning rate",
    "parties": "model sizes: gpu | cpu | smoke", "seed": "random seed of the rounds (pools, sampling, filters)",
    "data_seed": "seed of the data splits, initializations and warm-ups (-1 = --seed)", "device": "auto | cpu | cuda",
    "dtype": "auto | fp32 | bf16 (autocast on CUDA; auto = bf16 on CUDA with --llm/--slms checkpoints, else fp32, TF32 on CUDA)",
    "private_only": "comma-separated domains whose solutions only the clients hold (testbed knowledge split)",
    "private_only_share": "share of the private-only domains in each client's mix",
    "eval_subset": "evaluate rounds before the last on the first N problems of each test set (0 = all)",
    "counts_from": "results.json of a filter run: --method random (lada-random) picks that run's counts per student and round",
    "eval_split": "test | val: the sets every evaluation reads (val for tuning the testbed)",
    "slm_pretrain": "solved problems of the shared domains (from the LLM-only general set) in each generated SLM's warm-up, besides its private data",
    "grading": "how a final answer is graded, for the loop and the accuracies: flexible (GSM8K harness) | strict (\"#### N\") | checked (strict, and every <<a=b>> computes)",
    "eval_batch": "prompts per generation call", "score_batch": "paths per scoring batch", "cache": "directory of warmed-up models",
}
HELP.update(LORA_HELP)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        print(f"federated.py: error: {message}", file=sys.stderr)
        sys.exit(2)


def parse_args(argv=None):
    p = _Parser(description="LaDa: federated reasoning distillation (spec §2)")
    # what to run
    p.add_argument("--scenario", default="hetero", choices=SCENARIOS)
    p.add_argument("--method", default="lada", choices=list(METHODS))
    p.add_argument("--preset", choices=list(PRESETS), help="size preset: default (GPU sizes), cpu, smoke "
                   "(default: 'default' on a GPU, 'cpu' without one)")
    p.add_argument("--smoke", action="store_true", help="the smoke preset: whole loop on CPU in about a minute")
    p.add_argument("--llm_size", default="large", choices=["large", "mid"], help="LLM of the preset: large or mid-size")
    # real models and data
    p.add_argument("--llm", help="local Hugging Face checkpoint directory of the LLM")
    p.add_argument("--slms", help="comma-separated checkpoint directories of the SLMs")
    p.add_argument("--data", help="gsm8k:PATH or mathinstruct:PATH instead of the generated testbed")
    # output
    p.add_argument("--out", help="output directory (default runs/<scenario>-<method>-<preset>-s<seed>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last finished round")
    # every preset value (None = keep the preset's)
    for k, v in BASE.items():
        if isinstance(v, bool):  # a switch (--grad_ckpt)
            p.add_argument(f"--{k}", action="store_true", default=None, help=HELP.get(k, k))
            continue
        p.add_argument(f"--{k}", type=type(v), default=None, help=HELP.get(k, k) + f" (default {v!r} or the preset's)")
    args = p.parse_args(argv)
    return args


def choose_preset(args, has_gpu: bool):
    """(preset, notice): without --preset, the GPU sizes on a GPU and the CPU preset elsewhere; the
    notice (one line or None) says what runs when that is not what a GPU user would get."""
    on_cpu = args.device == "cpu" or (args.device in (None, "auto") and not has_gpu)
    if args.smoke:
        return "smoke", None
    if args.preset is None:
        if on_cpu:  # the GPU sizes would run for days here: say so, and run what fits
            return "cpu", (f"federated.py: no GPU, so this runs --preset cpu ({CPU_MINUTES['cpu']}); "
                           "--preset default runs the GPU sizes anyway")
        return "default", None
    if args.preset == "default" and on_cpu:
        return "default", (f"federated.py: warning: --preset default without a GPU takes {CPU_MINUTES['default']}; "
                           f"--preset cpu takes {CPU_MINUTES['cpu']}")
    return args.preset, None


def config_from_flags(argv):
    """(cfg, notice) from the command line's flags (flower_app.py resolves its flags here too)."""
    args = parse_args(argv)
    args.preset, notice = choose_preset(args, torch.cuda.is_available())
    preset = "smoke" if args.smoke else args.preset
    cfg = resolve_config(args)
    cfg["out"] = args.out or f"runs/{cfg['scenario']}-{cfg['method']}-{preset}-s{cfg['seed']}"
    cfg["resume"] = args.resume
    return cfg, notice


def main(argv=None):
    from data import DataError
    from models import ModelError

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
