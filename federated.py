"""federated.py: LaDa's federated loop (spec §2) and the command line.

    python federated.py --scenario hetero                    # the default run (GPU sizes)
    python federated.py --scenario hetero --smoke            # the whole loop on CPU in about a minute
    python federated.py --scenario hetero --preset cpu       # reduced sizes that learn on a CPU
    python federated.py --scenario homo --method fedmkt      # a baseline (local, fedmkt, random, ...)
    python federated.py --llm DIR --slms DIR,DIR --data gsm8k:PATH   # local checkpoints, real data
    python federated.py --scenario hetero --smoke --resume   # continue an interrupted run (same flags)

One loop serves every scenario and method (the two tables of spec §2): a method is a choice of
allocation (none, fedmkt's rule, random, the LaDa filter, all) and of loss (sft, dard).
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
from contextlib import nullcontext
from pathlib import Path

import torch

# -----------------------------------------------------------------------------
# Presets: plain dicts; flags override them. Sizes: see models.ZOO.

BASE = dict(
    rounds=5, pool_size=256, budget=64, min_budget=8, threshold=0.5, filter_epochs=10, filter_optimism=0.0,
    embed_dim=16,
    alpha=0.1, lam=0.5, beta=0.1, tau=0.1,                  # spec §4 defaults
    local_steps=50, local_batch=32, distill_epochs=2, distill_batch=16, lr=3e-4, lr_llm=3e-4,  # 0.1 x warm_lr
    gen_temperature=0.7, max_new_tokens=320, max_len=640, eval_batch=128,
    # data (spec §1, §6): generated testbed sizes
    n_public=4000, n_private=3000, n_val=200, n_test=500, n_general=20000, dirichlet=0.5,
    min_steps=2, max_steps=5, max_value=100,
    warm_llm=6000, warm_slm=1500, warm_batch=64, warm_lr=3e-3,
    parties="gpu", seed=0, data_seed=-1, device="auto", dtype="fp32", cache="cache",
)
PRESETS = {
    "default": dict(),
    "cpu": dict(parties="cpu", rounds=4, pool_size=64, budget=16, min_budget=4, local_steps=10, local_batch=32,
                n_public=2000, n_private=1500, n_test=100, n_val=50, n_general=6000, min_steps=2, max_steps=3,
                max_value=30, warm_llm=1200, warm_slm=400, warm_batch=32, max_new_tokens=160, max_len=320),
    "smoke": dict(parties="smoke", rounds=2, pool_size=16, budget=6, min_budget=2, local_steps=3, local_batch=8,
                  distill_epochs=1, distill_batch=8, n_public=200, n_private=100, n_test=24, n_val=10,
                  n_general=200, min_steps=2, max_steps=2, max_value=20, warm_llm=60, warm_slm=30, warm_batch=16,
                  max_new_tokens=64, max_len=200, filter_epochs=3),
}
# party sizes: (zoo name, tokenizer); hetero SLMs differ in architecture, size and tokenizer
PARTIES = {
    "gpu": dict(llm=("llama-26m", ("bpe", 2048)), mid=("llama-8m", ("bpe", 2048)),
                hetero=[("qwen2-3m", ("bpe", 640)), ("gpt2-2m", ("bpe", 400)), ("llama-1m", ("char",))]),
    "cpu": dict(llm=("llama-cpu-l", ("bpe", 1024)), mid=("llama-cpu-m", ("bpe", 1024)),
                hetero=[("qwen2-cpu-s", ("bpe", 384)), ("gpt2-cpu-s", ("bpe", 320)), ("llama-cpu-s", ("char",))]),
    "smoke": dict(llm=("llama-tiny", ("bpe", 300)), mid=("llama-tiny", ("bpe", 300)),
                  hetero=[("qwen2-tiny", ("bpe", 280)), ("gpt2-tiny", ("bpe", 260)), ("llama-tiny", ("char",))]),
}
SCENARIOS = ("hetero", "homo", "one2one", "llm2slm")
# method -> (allocation, loss); spec §2's table
METHODS = {"local": (None, None), "fedmkt": ("fedmkt", "sft"), "random": ("random", "dard"),
           "lada-filter": ("filter", "sft"), "lada-loss": ("all", "dard"), "lada": ("filter", "dard")}
RUN_KEYS = ("out", "resume", "rounds")  # flags that do not change the finished rounds (--rounds extends a run)


def resolve_config(args) -> dict:
    cfg = dict(BASE, **PRESETS["smoke" if args.smoke else args.preset])
    cfg.update(scenario=args.scenario, method=args.method, llm=args.llm, slms=args.slms, data=args.data,
               llm_size=args.llm_size)
    for k in BASE:  # every BASE key is also a flag (None = keep the preset)
        v = getattr(args, k, None)
        if v is not None:
            cfg[k] = v
    if cfg["data_seed"] < 0:  # data, initializations and warm-ups follow --seed unless fixed apart
        cfg["data_seed"] = cfg["seed"]
    if cfg["device"] == "auto":
        cfg["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    return cfg


# -----------------------------------------------------------------------------
# Messages: everything that crosses between server and clients is one of these dicts (spec §2)

SCHEMA = {  # message kind -> allowed fields; only public questions, path texts and per-sample scalars
    "pool": {"questions", "y_llm", "logp_llm_yllm", "nll_gold_llm"},
    "client_paths": {"y_slm", "logp_slm_yslm", "logp_slm_yllm", "nll_gold_slm"},
    "llm_score": {"logp_llm_yslm"},
    "weights": {"state_dict"},  # homo only: FedAvg of SLM weights (FedMKT's homogeneous setting)
}


def send(msg: dict, kind: str, traffic: dict, direction: str) -> dict:
    """Check a message against SCHEMA and count its bytes (UTF-8 text, 4 bytes per scalar)."""
    extra = set(msg) - SCHEMA[kind]
    if extra:
        raise RuntimeError(f"message '{kind}' carries fields outside the protocol: {sorted(extra)}")
    n = 0
    for v in msg.values():
        if isinstance(v, dict):
            n += sum(t.numel() * t.element_size() for t in v.values())
        elif isinstance(v, torch.Tensor):
            n += 4 * v.numel()
        else:
            n += sum(len(s.encode()) for s in v)
    traffic[direction] = traffic.get(direction, 0) + n
    return msg


# -----------------------------------------------------------------------------
# Parties and data

def make_data(cfg, num_clients):
    """Public pool and per-client data: generated (spec §6), or split from --data (IID shards)."""
    import data

    if cfg["data"] is None:
        return data.make_splits(num_clients, cfg["n_public"], cfg["n_private"], cfg["n_test"], cfg["n_val"],
                                cfg["n_general"], cfg["dirichlet"], cfg["data_seed"], (cfg["min_steps"], cfg["max_steps"]),
                                cfg["max_value"])
    rows = data.load_dataset(cfg["data"])
    random.Random(cfg["data_seed"]).shuffle(rows)
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


def build_parties(cfg, splits):
    """(models, tokenizers, info) for every party: warmed up on its own data (cached), or loaded."""
    from models import build_party, load_model

    dev = cfg["device"]
    if cfg["llm"] or cfg["slms"]:
        if not (cfg["llm"] and cfg["slms"]):
            raise ValueError("--llm and --slms go together")
        dirs = [cfg["llm"]] + cfg["slms"].split(",")
        names = ["llm"] + [f"slm{k + 1}" for k in range(len(dirs) - 1)]
        loaded = [load_model(d, device=dev) for d in dirs]
        info = {n: dict(path=d, params=sum(p.numel() for p in m.parameters())) for n, d, (m, _) in zip(names, dirs, loaded)}
        return {n: m for n, (m, _) in zip(names, loaded)}, {n: t for n, (_, t) in zip(names, loaded)}, info
    corpus = [p["question"] + "\n" + p["answer"] for p in splits["public"] + splits["general"]]
    models, toks, info = {}, {}, {}
    for i, (name, zoo, tok_spec) in enumerate(party_specs(cfg)):
        if name == "llm":
            warm_data, steps = splits["public"] + splits["general"], cfg["warm_llm"]
        else:
            warm_data, steps = splits["clients"][i - 1]["private"], cfg["warm_slm"]
        seed = cfg["data_seed"] + (0 if cfg["scenario"] == "homo" else i)  # homo SLMs share an initialization
        warm = dict(steps=steps, batch_size=cfg["warm_batch"], lr=cfg["warm_lr"], max_len=cfg["max_len"])
        models[name], toks[name], info[name] = build_party(name, zoo, tok_spec, corpus, warm_data, warm,
                                                           cfg["cache"], device=dev, seed=seed)
    return models, toks, info


def fedavg(models, names):
    """Average the SLMs' weights in place (FedMKT's homogeneous setting)."""
    with torch.no_grad():
        avg = {k: torch.stack([models[n].state_dict()[k].float() for n in names]).mean(0)
               for k in models[names[0]].state_dict()}
        for n in names:
            models[n].load_state_dict({k: v.to(models[n].state_dict()[k].dtype) for k, v in avg.items()})


# -----------------------------------------------------------------------------
# Checkpoints: the last finished round, atomically; --resume continues from it

def save_checkpoint(out, cfg, rnd, models, toks, opts, filters, results):
    from models import atomic_dir, commit_dir

    tmp = atomic_dir(out / "ckpt")
    for n, m in models.items():
        m.save_pretrained(str(tmp / n), safe_serialization=True)
        toks[n].save_pretrained(str(tmp / n))
    torch.save({"round": rnd, "opts": {n: o.state_dict() for n, o in opts.items()},
                "filters": {k: f.state_dict() for k, f in filters.items()}}, tmp / "state.pt")
    (tmp / "results.json").write_text(json.dumps(results, indent=1))
    (tmp / "config.json").write_text(json.dumps(cfg, indent=1))
    commit_dir(tmp, out / "ckpt")


def load_checkpoint(out, cfg, models, opts, filters):
    """Restore the last finished round; refuse a checkpoint made with a different config."""
    from models import load_model

    ck = out / "ckpt"
    saved = json.loads((ck / "config.json").read_text())
    saved = {**{k: v for k, v in BASE.items() if k not in saved}, **saved}  # keys added since: their defaults
    diff = sorted(k for k in set(saved) | set(cfg) if k not in RUN_KEYS and saved.get(k) != cfg.get(k))
    if diff:
        raise ValueError(f"{ck} was made with a different config ({', '.join(f'{k}={saved.get(k)!r}' for k in diff)}); "
                         "use another --out or the same flags")
    for n in models:
        m, _ = load_model(ck / n, device=cfg["device"])
        models[n].load_state_dict(m.state_dict())
    state = torch.load(ck / "state.pt", weights_only=False)
    for n, o in opts.items():
        o.load_state_dict(state["opts"][n])
    for k, f in filters.items():
        f.load_state_dict(state["filters"][k])
    return state["round"], json.loads((ck / "results.json").read_text())


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
# One party's view of the pool: its paths, their scores, correctness

def score(cfg, model, tok, questions, paths):
    """(summed log-probs, token counts) of each path under `model` (distill.score_paths with the run's sizes)."""
    from distill import score_paths

    return score_paths(model, tok, questions, paths, cfg["distill_batch"] * 2, cfg["device"], cfg["max_len"])


def paths_and_scores(cfg, model, tok, questions, seed):
    """A sampled path for each question (temperature gen_temperature) and its summed log-prob."""
    from data import format_prompt
    from eval import generate

    ys = generate(model, tok, [format_prompt(q) for q in questions], max_new_tokens=cfg["max_new_tokens"],
                  temperature=cfg["gen_temperature"], batch_size=cfg["eval_batch"], seed=seed, device=cfg["device"])
    lp, n = score(cfg, model, tok, questions, ys)
    return ys, lp, n


def gold_nll(cfg, model, tok, pool):
    """Per-character NLL of each gold solution (FedMKT's selective rule, compared across tokenizers)."""
    lp, _ = score(cfg, model, tok, [p["question"] for p in pool], [p["answer"] for p in pool])
    return -lp / torch.tensor([max(1, len(p["answer"])) for p in pool], dtype=torch.float32)


def allocate(kind, filt, feats, emb, nll_teacher_gold, nll_student_gold, cfg, rng):
    """Spec §2 step 5: the indices of the pool this student learns from."""
    n = feats.shape[0]
    if kind == "all":
        return list(range(n))
    if kind == "random":
        return sorted(rng.sample(range(n), min(cfg["budget"], n)))
    if kind == "fedmkt":  # learn where the teacher fits the gold solution better than the student
        return [i for i in range(n) if nll_teacher_gold[i] < nll_student_gold[i]]
    return sorted(filt.select(feats, emb).tolist())  # the LaDa filter (spec §3.2)


def reward_and_update(cfg, model, tok, qs, paths, idx, lp_before, n_before, correct, filt, feats, emb):
    """Spec §2 step 7 / §3.3: the student re-scores the sent paths it trained on; the rewards update
    its filter (when it has one). Returns the mean reward."""
    from filter import learnability_reward

    lp_after, n_after = score(cfg, model, tok, [qs[i] for i in idx], [paths[i] for i in idx])
    r = learnability_reward(-lp_before[idx] / n_before[idx], -lp_after / n_after, correct[idx])
    if filt is not None:
        filt.update(feats[idx], emb[idx], r)
    return float(r.mean())


def run(cfg):
    import data as data_mod
    import eval as ev
    from distill import distill, local_sft, teacher_targets
    from filter import FEATURE_DIM, LearnabilityFilter, project_embeddings, sample_features
    from models import mean_hidden

    if not 0.0 <= cfg["filter_optimism"] <= 1.0:
        raise ValueError(f"--filter_optimism must be in [0, 1], got {cfg['filter_optimism']}")
    out = Path(cfg["out"])
    ckpt = out / "ckpt"
    if ckpt.exists() and not cfg["resume"]:
        raise ValueError(f"{out} already holds a run; add --resume to continue it, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    print(json.dumps({k: v for k, v in cfg.items()}, indent=None))
    torch.manual_seed(cfg["seed"])
    dev = cfg["device"]
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cfg["dtype"] == "bf16" and dev.startswith("cuda") else nullcontext()

    # --- data and parties (spec §1, §6)
    n_slm = len(party_specs(cfg)) - 1 if not cfg["slms"] else len(cfg["slms"].split(","))
    splits = make_data(cfg, n_slm)
    models, toks, info = build_parties(cfg, splits)
    names = list(models)
    slms = names[1:]
    alloc, loss = METHODS[cfg["method"]]
    frozen_llm = cfg["scenario"] == "llm2slm"  # only the LLM -> SLM direction
    public = splits["public"]
    local = {"llm": public, **{n: splits["clients"][k]["private"] for k, n in enumerate(slms)}}
    tests = {"llm": splits["public_test"], **{n: splits["clients"][k]["test"] for k, n in enumerate(slms)}}
    opts = {n: torch.optim.AdamW(models[n].parameters(), lr=cfg["lr_llm"] if n == "llm" else cfg["lr"],
                                 weight_decay=0.0) for n in names}
    filters = {}
    if alloc == "filter":  # one filter per (client, direction), living with the student (spec §2)
        for k, n in enumerate(slms):
            mk = lambda s: LearnabilityFilter(FEATURE_DIM, cfg["embed_dim"], cfg["budget"], cfg["min_budget"],
                                              cfg["threshold"], epochs=cfg["filter_epochs"], seed=s, reward_scale="q90",
                                              optimism=cfg["filter_optimism"])
            filters[f"down/{n}"] = mk(cfg["seed"] * 100 + 2 * k)
            if not frozen_llm:
                filters[f"up/{n}"] = mk(cfg["seed"] * 100 + 2 * k + 1)

    def evaluate_all():
        accs, strict = {}, {}
        with amp:
            for n in names:
                r = ev.evaluate(models[n], toks[n], tests[n], batch_size=cfg["eval_batch"],
                                max_new_tokens=cfg["max_new_tokens"], device=dev)
                accs[n], strict[n] = r["flexible"], r["strict"]
        return accs, strict

    start = 0
    if cfg["resume"] and ckpt.exists():
        start, results = load_checkpoint(out, cfg, models, opts, filters)
        print(f"resuming after round {start}")
    else:
        acc0, strict0 = evaluate_all()
        results = {"config": cfg, "parties": info, "initial": acc0, "initial_strict": strict0, "rounds": []}
    (out / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in results["rounds"]))
    print("parties:", json.dumps(info))
    print("after warm-up:", {n: round(a, 3) for n, a in results["initial"].items()})

    for rnd in range(start + 1, cfg["rounds"] + 1):
        t0 = time.time()
        rng = random.Random(f"{cfg['seed']}-{rnd}")
        torch.manual_seed(cfg["seed"] * 1000 + rnd)
        traffic, selected, rewards, losses, errors = {}, {}, {}, {}, {}
        with amp:
            # --- 1. local step: every party on its own data (the frozen LLM of llm2slm excepted)
            for n in names:
                if not (n == "llm" and frozen_llm):
                    losses[f"local/{n}"] = local_sft(models[n], toks[n], opts[n], local[n], cfg["local_steps"],
                                                     cfg["local_batch"], rng, dev, cfg["max_len"])
            if cfg["scenario"] == "homo":  # FedAvg of the homogeneous SLMs' weights
                for n in slms:
                    send({"state_dict": models[n].state_dict()}, "weights", traffic, "up")
                fedavg(models, slms)
                for n in slms:
                    send({"state_dict": models[n].state_dict()}, "weights", traffic, "down")

            if alloc is not None:
                # --- 2. server -> clients: the pool, the LLM's paths and its scores of them
                pool = rng.sample(public, min(cfg["pool_size"], len(public)))
                qs = [p["question"] for p in pool]
                gold = [p["answer"] for p in pool]  # public: both sides check paths against it
                y_llm, lp_llm_yllm, n_llm_yllm = paths_and_scores(cfg, models["llm"], toks["llm"], qs, cfg["seed"] * 10**6 + rnd)
                c_llm = torch.tensor([float(ev.is_correct(y, g)) for y, g in zip(y_llm, gold)])
                pool_msg = {"questions": qs, "y_llm": y_llm, "logp_llm_yllm": lp_llm_yllm}
                if alloc == "fedmkt":
                    pool_msg["nll_gold_llm"] = gold_nll(cfg, models["llm"], toks["llm"], pool)
                llm_side = []  # what the server learns, per client: (name, samples for the LLM, reward inputs)
                if not frozen_llm:  # the server's embedding of each pooled question (F_k^up's context)
                    emb_up = project_embeddings(mean_hidden(models["llm"], toks["llm"], [data_mod.format_prompt(x) for x in qs],
                                                            cfg["eval_batch"], dev), cfg["embed_dim"], cfg["seed"])
                for k, n in enumerate(slms):
                    try:
                        msg = send(pool_msg, "pool", traffic, "down")
                        # --- 3. client k -> server: its own paths and its scores of both paths
                        y_k, lp_k_yk, n_k_yk = paths_and_scores(cfg, models[n], toks[n], msg["questions"],
                                                                cfg["seed"] * 10**6 + 1000 * (k + 1) + rnd)
                        lp_k_yllm, n_k_yllm = score(cfg, models[n], toks[n], qs, msg["y_llm"])
                        up = {"y_slm": y_k, "logp_slm_yslm": lp_k_yk, "logp_slm_yllm": lp_k_yllm}
                        if alloc == "fedmkt":
                            up["nll_gold_slm"] = gold_nll(cfg, models[n], toks[n], pool)
                        up = send(up, "client_paths", traffic, "up")
                        # --- 4. server -> client k: the LLM's score of the client's paths
                        lp_llm_yk, n_llm_yk = score(cfg, models["llm"], toks["llm"], qs, up["y_slm"])
                        down = send({"logp_llm_yslm": lp_llm_yk}, "llm_score", traffic, "down")
                        c_k = torch.tensor([float(ev.is_correct(y, g)) for y, g in zip(y_k, gold)])
                        len_llm = torch.tensor([len(y) for y in y_llm], dtype=torch.float32)
                        len_k = torch.tensor([len(y) for y in y_k], dtype=torch.float32)

                        # --- 5. allocation on the client: F_k^down picks A_k (student S_k, teacher L)
                        feats = sample_features(lp_k_yllm, msg["logp_llm_yllm"], lp_k_yk, down["logp_llm_yslm"],
                                                len_llm, len_k, c_llm, c_k)
                        emb = project_embeddings(mean_hidden(models[n], toks[n], [data_mod.format_prompt(q) for q in qs],
                                                             cfg["eval_batch"], dev), cfg["embed_dim"], cfg["seed"])
                        A = allocate(alloc, filters.get(f"down/{n}"), feats, emb, msg.get("nll_gold_llm"),
                                     up.get("nll_gold_slm"), cfg, rng)
                        q = teacher_targets(msg["logp_llm_yllm"], down["logp_llm_yslm"], len_llm, len_k, c_llm, c_k, cfg["tau"])
                        samples = [dict(question=qs[i], y_pos=y_llm[i], y_neg=y_k[i], q=float(q[i]),
                                        correct_pos=bool(c_llm[i])) for i in A]
                        # --- 6. distillation on the client (teacher L: y+ = y_L, y- = y_k)
                        st = distill(models[n], toks[n], opts[n], samples, local[n], loss, cfg, rng, dev)
                        losses.update({f"{key}/{n}": v for key, v in st.items() if key not in ("steps", "n")})
                        # --- 7. rewards: what S_k learned of y_L, and the filter's update
                        if A:
                            rewards[f"down/{n}"] = reward_and_update(cfg, models[n], toks[n], qs, y_llm, A, lp_k_yllm, n_k_yllm,
                                                                     c_llm, filters.get(f"down/{n}"), feats, emb)
                        selected[f"down/{n}"] = len(A)

                        # --- 5'. allocation on the server: F_k^up picks B_k (student L, teacher S_k)
                        if not frozen_llm:
                            feats_up = sample_features(lp_llm_yk, up["logp_slm_yslm"], lp_llm_yllm, up["logp_slm_yllm"],
                                                       len_k, len_llm, c_k, c_llm)
                            B = allocate(alloc, filters.get(f"up/{n}"), feats_up, emb_up, up.get("nll_gold_slm"),
                                         msg.get("nll_gold_llm"), cfg, rng)
                            q_up = teacher_targets(up["logp_slm_yslm"], up["logp_slm_yllm"], len_k, len_llm, c_k, c_llm, cfg["tau"])
                            llm_side.append((n, [dict(question=qs[i], y_pos=y_k[i], y_neg=y_llm[i], q=float(q_up[i]),
                                                      correct_pos=bool(c_k[i])) for i in B], B, feats_up, emb_up, lp_llm_yk, n_llm_yk, c_k, y_k))
                            selected[f"up/{n}"] = len(B)
                    except Exception as e:  # a failing client is logged and skipped; the round goes on
                        errors[n] = f"{type(e).__name__}: {e}"
                        print(f"round {rnd}: client {n} failed and is skipped ({errors[n]})", file=sys.stderr)

                # --- 6'. distillation on the server: L learns from the union of the B_k
                if llm_side:
                    samples = [s for _, ss, *_ in llm_side for s in ss]
                    st = distill(models["llm"], toks["llm"], opts["llm"], samples, local["llm"], loss, cfg, rng, dev)
                    losses.update({f"{key}/llm": v for key, v in st.items() if key not in ("steps", "n")})
                    # --- 7'. rewards: what L learned of each y_k (novel to the LLM)
                    for n, _, B, feats_up, emb_up, lp_before, n_before, c_k, y_k in llm_side:
                        if not B:
                            continue
                        rewards[f"up/{n}"] = reward_and_update(cfg, models["llm"], toks["llm"], qs, y_k, B, lp_before, n_before,
                                                               c_k, filters.get(f"up/{n}"), feats_up, emb_up)

        # --- evaluation, log, checkpoint
        acc, strict = evaluate_all()
        entry = {"round": rnd, "accuracy": acc, "strict": strict, "selected": selected, "reward": rewards,
                 "loss": {k: v for k, v in losses.items() if not (isinstance(v, float) and math.isnan(v))},
                 "bytes": traffic, "errors": errors, "seconds": round(time.time() - t0, 1)}
        results["rounds"].append(entry)
        save_checkpoint(out, cfg, rnd, models, toks, opts, filters, results)
        with open(out / "log.jsonl", "a") as f:
            f.write(json.dumps(entry) + "\n")
        write_report(out, results)
        print(f"round {rnd}/{cfg['rounds']} ({entry['seconds']}s) accuracy", {n: round(a, 3) for n, a in acc.items()},
              "selected", selected, "MB", {d: round(b / 1e6, 3) for d, b in traffic.items()}, flush=True)
    print(write_report(out, results))
    return results


# -----------------------------------------------------------------------------
# Command line

HELP = {
    "rounds": "communication rounds T", "pool_size": "public questions drawn per round (|P|)",
    "budget": "most samples a filter (or random) allocates per round", "min_budget": "fewest samples a filter allocates",
    "threshold": "filter score u(x) needed to be picked", "filter_epochs": "epochs of filter training per round",
    "filter_optimism": "residual target of passed-over samples for the exploration net, 0 = spec §3.2 (filter.py)",
    "embed_dim": "sample embedding size of the filter context", "alpha": "weight of the NLL(y+) term (spec §4)",
    "lam": "weight of the local SFT anchor L_local (spec §4)", "beta": "DPO-like temperature beta (spec §4)",
    "tau": "teacher-margin temperature, nats per character (spec §4)", "local_steps": "local SFT steps per round",
    "local_batch": "local SFT batch size", "distill_epochs": "passes over the allocated samples",
    "distill_batch": "pairs per distillation step", "lr": "SLM learning rate (AdamW)", "lr_llm": "LLM learning rate",
    "gen_temperature": "sampling temperature of the exchanged paths", "max_new_tokens": "tokens per generated path",
    "max_len": "tokens per training sequence (prompt + path)", "eval_batch": "prompts per generation batch",
    "n_public": "public pool size", "n_private": "private examples per client", "n_val": "validation examples per party",
    "n_test": "test examples per party", "n_general": "extra general data for the LLM warm-up",
    "dirichlet": "Dirichlet alpha of the clients' domain mixes (smaller = more non-IID)",
    "min_steps": "fewest reasoning steps of a generated problem", "max_steps": "most reasoning steps",
    "max_value": "size of the numbers in generated problems", "warm_llm": "LLM warm-up steps",
    "warm_slm": "SLM warm-up steps", "warm_batch": "warm-up batch size", "warm_lr": "warm-up learning rate",
    "parties": "model sizes: gpu | cpu | smoke", "seed": "random seed of the rounds (pools, sampling, filters)",
    "data_seed": "seed of the data splits, initializations and warm-ups (-1 = --seed)", "device": "auto | cpu | cuda",
    "dtype": "fp32 | bf16 (autocast on CUDA)", "cache": "directory of warmed-up models",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        print(f"federated.py: error: {message}", file=sys.stderr)
        sys.exit(2)


def parse_args(argv=None):
    p = _Parser(description="LaDa: federated reasoning distillation (spec §2)")
    # what to run
    p.add_argument("--scenario", default="hetero", choices=SCENARIOS)
    p.add_argument("--method", default="lada", choices=list(METHODS))
    p.add_argument("--preset", default="default", choices=list(PRESETS), help="size preset (default = GPU sizes)")
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
        p.add_argument(f"--{k}", type=type(v), default=None, help=HELP.get(k, k) + f" (default {v!r} or the preset's)")
    args = p.parse_args(argv)
    return args


def main(argv=None):
    from data import DataError
    from models import ModelError

    args = parse_args(argv)
    cfg = resolve_config(args)
    preset = "smoke" if args.smoke else args.preset
    cfg["out"] = args.out or f"runs/{cfg['scenario']}-{cfg['method']}-{preset}-s{cfg['seed']}"
    cfg["resume"] = args.resume
    try:
        run(cfg)
    except (DataError, ModelError, ValueError, FileNotFoundError) as e:
        print(f"federated.py: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted; continue with: python federated.py {' '.join(argv or sys.argv[1:])} --resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
