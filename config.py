"""config.py: presets, flags and the resolved config of a run (one config path: preset, then the
method's own defaults, then flags; the resolved dict is printed first and saved with every result).

    cfg, notice = config_from_flags(argv)     # what federated.py and flower_app.py both call

Sizes of the parties: models.ZOO. Scenarios and methods (spec §2's tables): methods.py.
"""
import argparse
import math
import sys
from pathlib import Path

import torch

import protocol as P
from answers import MODES
from lora import LORA_FLAGS, LORA_HELP, require_peft

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
    parties="gpu", seed=0, data_seed=-1, device="auto", dtype="auto", cache="cache", rewarm=False,
)
BASE.update(LORA_FLAGS)  # --lora, --lora_alpha, --lora_dropout, --lora_targets, --lora_parties, --grad_ckpt (lora.py)
PRESETS = {
    "default": dict(),
    # a small testbed (docs/cpu.md): the testbed's data design (1-3-step problems with numbers up to 12, the
    # private-only domain "time", checked grading, scarce private data after 1000 shared-domain problems) at
    # sizes a 2-core CPU runs in about a minute; its hetero warm-ups ship in bases/ (`python bases/make.py`);
    # plugin_budget: v2's A_k at most a quarter of the pool, as the default's 64 of 256
    "cpu": dict(parties="cpu", rounds=3, pool_size=32, budget=8, plugin_budget=8, min_budget=2, local_steps=5, local_batch=32,
                n_public=3000, n_private=100, n_test=200, n_val=50, n_general=6000, min_steps=1, max_steps=3,
                max_value=12, private_only="time", private_only_share=0.3, grading="checked", slm_pretrain=1000,
                warm_llm=1200, warm_slm=1200, warm_batch=32, max_new_tokens=256, eval_subset=50,
                eval_batch=128, score_batch=128),
    # the testbed of the comparison (docs/study.md, "The testbed"): scarce private data, a domain only the clients
    # know, 1-3-step problems the SLMs learn in part, a budget of an eighth of the pool
    "testbed": dict(parties="testbed", rounds=5, pool_size=256, budget=16, min_budget=4, local_steps=10, local_batch=32,
                    distill_epochs=8,
                    lr=1e-3, n_public=3000, n_private=100, n_test=500, n_val=200, n_general=6000, min_steps=1,
                    max_steps=3, max_value=12, private_only="time", private_only_share=0.3, warm_llm=1200,
                    warm_slm=400, warm_batch=32, max_new_tokens=256, eval_subset=100, eval_batch=128, score_batch=128,
                    grading="checked", slm_pretrain=1000),
    "smoke": dict(parties="smoke", rounds=2, pool_size=16, budget=6, plugin_budget=6, min_budget=2, local_steps=3, local_batch=8,
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
RUN_KEYS = ("out", "resume", "rounds")  # flags that do not change the finished rounds (--rounds extends a run)


def resolve_config(args, device_here=True) -> dict:
    """The run's config (see the module's docstring); ValueError, one line naming the flag, for a value no
    run can use. device_here=False: a plan for another machine (memory.py), whose --device may be absent."""
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
        # the built-in parties learned far less and stepped 5x slower under bf16 on an H200 (docs/gpu.md)
        cfg["dtype"] = "bf16" if cfg["device"].startswith("cuda") and (cfg["llm"] or cfg["slms"]) else "fp32"
    if cfg["dtype"] not in ("fp32", "bf16"):
        raise ValueError(f"--dtype must be auto, fp32 or bf16, got {cfg['dtype']!r}")
    if cfg["method"] == "fedavg" and not P.SCENARIOS[cfg["scenario"]]["fedavg"]:
        raise ValueError("--method fedavg needs --scenario homo (only SLMs of one architecture can average weights)")
    if cfg["counts_from"] and (cfg["method"] not in ("random", "lada-random") or not Path(cfg["counts_from"]).is_file()):
        raise ValueError(f"--counts_from {cfg['counts_from']}: needs --method random or lada-random and a results.json of a run")
    if cfg["grading"] not in MODES:
        raise ValueError(f"--grading must be one of {', '.join(MODES)}, got {cfg['grading']!r}")
    if cfg["eval_split"] not in ("test", "val"):
        raise ValueError(f"--eval_split must be test or val, got {cfg['eval_split']!r}")
    if not 0.0 <= cfg["filter_optimism"] <= 1.0:
        raise ValueError(f"--filter_optimism must be in [0, 1], got {cfg['filter_optimism']}")
    cfg["stop_at_answer_line"] = bool(cfg["llm"])  # checkpoints trained elsewhere may not end a path with EOS
    check_config(cfg, device_here)  # ranges first: a --lora -1 is wrong with or without peft
    if cfg["lora"]:  # one line now, not a traceback once the models are loaded
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


# The largest value each size flag may take: far above any run, below what would only end in an allocation
# failure (a traceback) instead of a line
MAXIMA = dict(rounds=10**5, pool_size=10**6, budget=10**6, min_budget=10**6, plugin_budget=10**6, filter_epochs=10**4,
              embed_dim=4096, local_steps=10**6, local_batch=2**16, distill_epochs=10**4, distill_batch=2**16,
              max_new_tokens=2**20, max_len=2**24, eval_batch=2**16, score_batch=2**16, n_public=10**7, n_private=10**7,
              n_val=10**7, n_test=10**7, n_general=10**7, min_steps=64, max_steps=64, max_value=10**9, warm_llm=10**8,
              warm_slm=10**8, warm_batch=2**16, eval_subset=10**7, slm_pretrain=10**7, lora=2**16)


def check_config(cfg, device_here=True):
    """ValueError (one line naming the flag) for a value no run can use: out of RANGES, not finite,
    min_budget > budget, min_steps > max_steps, an unknown device (or, device_here, a GPU this machine
    lacks), dtype or party set, a path that is a file."""
    for k, v in BASE.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):  # switches (e.g. --grad_ckpt) are not numbers
            x, rule = cfg[k], RANGES.get(k, ">= 0")
            if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or not RULES[rule](x):
                raise ValueError(f"--{k} must be {'a finite number ' if isinstance(v, float) else 'an integer '}{rule}, got {x!r}")
            if k in MAXIMA and x > MAXIMA[k]:
                raise ValueError(f"--{k} must be at most {MAXIMA[k]}, got {x!r}")
    ordered = [("min_budget", "budget"), ("min_steps", "max_steps")]
    if cfg["method"] in P.PLUGIN:  # v2's filter picks at least min_budget within H_k too
        ordered.append(("min_budget", "plugin_budget"))
    for lo, hi in ordered:
        if cfg[lo] > cfg[hi]:
            raise ValueError(f"--{lo} {cfg[lo]} is larger than --{hi} {cfg[hi]}")
    if cfg["parties"] not in PARTIES:
        raise ValueError(f"--parties must be one of {', '.join(PARTIES)}, got {cfg['parties']!r}")
    dev = cfg["device"]
    if not (dev == "cpu" or dev == "cuda" or dev.startswith("cuda:") and dev[5:].isdigit()):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {dev!r}")
    if device_here and dev.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {dev} asks for a GPU, but CUDA is not available here")
    if Path(cfg["cache"]).exists() and not Path(cfg["cache"]).is_dir():
        raise ValueError(f"--cache {cfg['cache']} is a file, not a directory")
    if cfg["slms"] is not None and not all(d.strip() for d in cfg["slms"].split(",")):
        raise ValueError(f"--slms {cfg['slms']!r} has an empty entry")


# What a run takes where no GPU is found (measured: README, quick start)
CPU_MINUTES = {"cpu": "about a minute on a 2-core CPU, from the warmed-up models in bases/",
               "default": "days on a CPU (it is sized for one GPU)"}


def party_specs(cfg):
    """[(name, zoo name, tokenizer spec)] for the LLM and the scenario's SLMs."""
    sizes = PARTIES[cfg["parties"]]
    llm = sizes["mid"] if cfg["llm_size"] == "mid" else sizes["llm"]
    slms = [sizes["hetero"][i] for i in P.SCENARIOS[cfg["scenario"]]["slms"]]
    return [("llm",) + llm] + [(f"slm{k + 1}",) + s for k, s in enumerate(slms)]


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
    "parties": "model sizes: gpu | cpu | testbed | smoke", "seed": "random seed of the rounds (pools, sampling, filters)",
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
    "rewarm": "warm the generated parties up here (into --cache) instead of starting from the shipped bases in bases/",
}
HELP.update(LORA_HELP)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        print(f"federated.py: error: {message}", file=sys.stderr)
        sys.exit(2)


def parse_args(argv=None):
    p = _Parser(description="LaDa: federated reasoning distillation (spec §2)")
    # what to run
    p.add_argument("--scenario", default="hetero", choices=list(P.SCENARIOS), help="spec §2's scenarios (methods.SCENARIOS)")
    p.add_argument("--method", default="lada", choices=list(P.METHODS), help="lada (v2, spec §4'), its ablations "
                   "lada-random, lada-sft, lada-nofilter; baselines local, fedmkt; v1: lada-v1, lada-v1-filter, "
                   "lada-v1-loss, random; fedavg (homo), oracle (the testbed's headroom check)")
    p.add_argument("--preset", choices=list(PRESETS), help="size preset: default (GPU sizes), cpu, testbed (the study's), "
                   "smoke (default: 'default' on a GPU, 'cpu' without one)")
    p.add_argument("--smoke", action="store_true", help="the smoke preset: the whole loop on a CPU, 87 s from a cold cache, 21 s cached")
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
