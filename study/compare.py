"""compare.py: LaDa against its baselines on the testbed, with the power to tell them apart.

    python study/compare.py --headroom              # 1. the headroom check: oracle allocation vs local (hetero, 3 seeds, validation sets)
    python study/compare.py                         # 2. the grid: every scenario x method x seed, then the gap runs
    python study/compare.py --tables                # only rebuild the tables, verdicts and plot from results/
    python study/compare.py --status --workdir W    # what is done, running and to do, and the hours left
    python study/compare.py --tune                  # follow-up F0: the local step's lr, then the distillation's per loss (hetero, seed 0, validation)
    python study/compare.py --followup              # follow-up F1-F4: hetero, fresh seeds 3-5, each method at its tuned lr
    python study/compare.py --jobs 16               # any of the above in 16 processes that share the runs (one per core)
    python study/compare.py --preset smoke --force --seeds 0   # the whole pipeline in minutes (results in runs/compare-smoke)
    python study/compare.py --v2-tune --jobs 2      # LaDa v2 (docs/study-v2.md): gamma on hetero seed 0's validation sets
    python study/compare.py --v2 --jobs 2           # then v2's test runs: hetero, fresh seeds 6-8, at the chosen gamma

Each run is `federated.py --preset testbed` with one (scenario, method, seed); the seed varies the
data, the warm-ups and the rounds. Its results.json is copied to
results/testbed/<scenario>/<method>-s<seed>.json (committed), so the tables, the hypotheses' verdicts
and the plot are rebuilt from those files alone. A run whose file exists is skipped and an
interrupted run resumes from its last round: an interrupted grid loses one round at most. Several
compare.py processes can share a grid and a --workdir (`--jobs N` starts them; or by hand, e.g. `--seeds
0,2` and `--seeds 1`, or the grid beside --tune): each claims a run with a lock file before starting it,
leaves a run another live process holds, starts a `random` run once its `lada` counts are written (waiting
while another process runs that lada, as --tune waits for stage 1 before stage 2). Runs of the same
seed share warm-ups through the cache, each party warmed up by one process (models.lock_entry).
`random` runs after `lada` of the same scenario and seed and allocates, per student and round, the
count lada's filter picked (--counts_from), so the two differ only in which samples.

Every method-vs-method claim is a paired difference of final accuracy (the same test problems, the
same seeds) with a 95% bootstrap interval: seeds resampled, then each party's test problems within a
seed. The hypotheses and their rule were written (docs/study.md) before the grid ran.
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the project's modules, when run as `python study/compare.py`
import config  # noqa: E402
import federated  # noqa: E402
from methods import SCENARIOS  # noqa: E402

PRESET = "testbed"  # --preset
RESULTS = None  # --results: where the result files go (None: the repository's results/, committed)
POLL = 10  # seconds between looks at runs that other processes hold
BASELINES = ["local", "fedmkt", "random", "fedavg"]
ORDER = ["local", "fedavg", "fedmkt", "random", "lada-filter", "lada-loss", "lada"]  # lada before random (its counts)
RUN_ORDER = ["local", "fedavg", "fedmkt", "lada", "random", "lada-filter", "lada-loss"]
SEEDS = [0, 1, 2]
# the follow-up (docs/study.md, "Follow-up: DARD's learning rate", pre-registered before its first run)
TUNE_METHODS, TUNE_SCALES, LOCAL_SCALES = ("fedmkt", "lada-filter", "lada"), (1.0, 0.3, 0.1), (1.0, 0.3, 0.1)
FOLLOWUP_METHODS, FOLLOWUP_SEEDS = ("local", "fedmkt", "lada", "random", "lada-filter"), (3, 4, 5)
# The v1 study's files (every folder but v2/) keep v1's labels in their names and configs: lada, lada-filter and
# lada-loss there are what federated.py now calls lada-v1, lada-v1-filter and lada-v1-loss (`run_one` maps them).
V1 = {"lada": "lada-v1", "lada-filter": "lada-v1-filter", "lada-loss": "lada-v1-loss"}
# LaDa v2 (spec §4'; docs/study-v2.md, pre-registered before its first run): gamma on hetero seed 0's validation
# sets, then fresh test seeds; every arm at the v1 follow-up's validated rates (local x0.3, the host's distillation x1)
V2_GAMMAS, V2_SEEDS = (0.1, 0.3, 1.0), (6, 7, 8)
V2_METHODS = ("local", "fedmkt", "lada", "lada-random", "lada-sft")  # lada before lada-random (its counts)
V2_FLAGS = ["--local_lr_scale", "0.3", "--distill_lr_scale", "1.0"]


# -----------------------------------------------------------------------------
# Runs

def res_root() -> Path:
    return (RESULTS or ROOT / "results") / PRESET


def show(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def run_one(scenario, method, seed, extra, dest: Path, workdir: Path):
    """federated.py once (resuming its own directory if it was cut), results.json copied to dest atomically."""
    out = workdir / dest.relative_to(res_root()).with_suffix("")
    if not dest.is_relative_to(res_root() / "v2"):  # the v1 study's labels (V1)
        method = V1.get(method, method)
    args = ["--preset", PRESET, "--scenario", scenario, "--method", method, "--seed", str(seed), "--out", str(out),
            "--cache", str(workdir / "cache")] + extra + (["--resume"] if (out / "ckpt").exists() else [])
    t0 = time.time()
    if federated.main(args) != 0:
        raise SystemExit(f"compare.py: run failed: federated.py {' '.join(args)}")
    res = json.loads((out / "results.json").read_text())
    res["config"].pop("cache", None), res["config"].pop("out", None)
    res["wall_seconds"] = round(time.time() - t0, 1)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=1))
    os.replace(tmp, dest)
    print(f"compare.py: {show(dest)} in {res['wall_seconds']:.0f}s", flush=True)
    supersede_other_warm_ups(dest, res)
    supersede_random_of_other_counts(dest.parent, res["config"]["seed"])


def warm_ups(res: dict) -> dict:
    """{(party, zoo): warm-up loss} of a run: which warmed-up models it started from."""
    return {(n, p.get("zoo")): p["warm_loss"] for n, p in res.get("parties", {}).items() if "warm_loss" in p}


def supersede_other_warm_ups(dest: Path, res: dict) -> list[Path]:
    """Runs of one folder and seed are compared problem by problem, so they must start from the same
    warmed-up models. A warm-up is reproducible on one machine but not bit for bit across machines
    (docs/study.md, "One warm-up per seed"), so a run whose warm-ups differ from those of the committed runs
    beside it (same folder and seed, same party and model) moves those to superseded/warm-ups/, and
    the grid runs them again from the current ones. Returns the moved files."""
    mine, seed, moved = warm_ups(res), res["config"]["seed"], []
    for peer in sorted(dest.parent.glob(f"*-s{seed}.json")):
        if peer == dest:
            continue
        theirs = warm_ups(json.loads(peer.read_text()))
        if any(k in theirs and theirs[k] != v for k, v in mine.items()):
            moved.append(supersede(peer, "warm-ups", f"started from other warm-ups than {dest.name}"))
    return moved


def took_counts(rand: dict, lada: dict) -> bool:
    """Whether a `random` (v1) or `lada-random` (v2) run picked, per round and student, what the `lada`
    run picked: its count, or (v2) all of its own host allocation H_k where that is smaller."""
    def want(mine, theirs):
        return {k: min(n, mine.get("plugin", {}).get(k, {}).get("H", n)) for k, n in theirs.get("selected", {}).items()}
    return (len(rand["rounds"]) == len(lada["rounds"])
            and all(m.get("selected", {}) == want(m, t) for m, t in zip(rand["rounds"], lada["rounds"])))


def supersede_random_of_other_counts(folder: Path, seed: int) -> Path | None:
    """`random` (v1) and `lada-random` (v2) take, per student and round, the counts of the `lada` run of
    their folder and seed. If that `lada` run was run again (say, from other warm-ups) after they read
    its counts, the two no longer match: the random run moves to superseded/counts/ and the grid runs it
    again. Returns the moved file, if any."""
    lada, moved = folder / f"lada-s{seed}.json", None
    if not lada.exists():
        return None
    theirs = json.loads(lada.read_text())
    for rand in (folder / f"random-s{seed}.json", folder / f"lada-random-s{seed}.json"):
        if rand.exists() and not took_counts(json.loads(rand.read_text()), theirs):
            moved = supersede(rand, "counts", f"took other counts than {lada.name}")
    return moved


def supersede(result: Path, why: str, because: str) -> Path:
    """Move a committed result to superseded/<why>/<its folder>/, where the grid no longer finds it
    (so it runs again), saying so; returns the new path."""
    to = res_root() / "superseded" / why / result.parent.name / result.name
    to.parent.mkdir(parents=True, exist_ok=True)
    os.replace(result, to)
    print(f"compare.py: {show(result)} {because}; moved to {show(to)} to be run again", flush=True)
    return to


def claim(dest: Path, workdir: Path):
    """A lock file per run, so that several compare.py processes can share one grid (and one workdir):
    returns the lock, or None while another live process holds the run. A lock whose process is gone
    is taken over (that run resumes from its last round)."""
    lock = lock_path(dest, workdir)
    lock.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            if holder(dest, workdir) is not None:
                return None  # held by a live process
            lock.unlink(missing_ok=True)  # its process is gone
            continue
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        return lock
    return None


def grid_runs(scenarios, methods, seeds, scenario_lada_loss=False):
    """(scenario, method, seed, extra flags, result file) of the grid, in run order: scenario by
    scenario, each with all its seeds (a grid cut short leaves whole scenarios to test), then the gap
    runs; `random` after `lada`. `lada-loss` runs in the gap runs only (H5 reads it there): in the
    scenarios it is the costliest run by far (the whole pool, both directions; about two hours), no
    hypothesis reads it, and it could no longer share its seed's warm-ups with the runs beside it
    (docs/study.md, "One warm-up per seed"); `--scenario_lada_loss` adds it back, last."""
    res = res_root()

    def scenario_runs(pick):
        for scen in scenarios:
            for seed in seeds:
                for m in [m for m in RUN_ORDER if m in methods and pick(m)]:
                    if m == "fedavg" and scen != "homo":  # FedAvg needs one architecture
                        continue
                    extra = ["--counts_from", str(res / scen / f"lada-s{seed}.json")] if m == "random" else []
                    yield scen, m, seed, extra, res / scen / f"{m}-s{seed}.json"

    yield from scenario_runs(lambda m: m != "lada-loss")
    for seed in seeds:
        for size in ("mid", "large"):  # the learnability gap: the smallest SLM alone with either LLM
            for m in ("lada-loss", "lada"):
                yield "one2one", m, seed, ["--llm_size", size], res / "gap" / f"{size}-{m}-s{seed}.json"
    if scenario_lada_loss:
        yield from scenario_runs(lambda m: m == "lada-loss")


def best_scale(res_dir: Path, name: str, scales, sub: str = "tune") -> float | None:
    """The scale x whose tuning run `sub/name.format(x=x)` has the highest SLM mean on the validation sets;
    a tie goes to the larger scale, the nearer to the registered setting (means rounded: equal counts can
    differ in the float's last bit). None while a run is missing."""
    got = {x: runs_of(res_dir, sub, name.format(x=x)).get(0) for x in scales}
    if any(r is None for r in got.values()):
        return None
    return max(scales, key=lambda x: (round(slm_accuracy(got[x]), 9), x))


def tuned_local_scale(res_dir: Path) -> float | None:
    """F0, stage 1: the --local_lr_scale whose `local` run is best (`best_scale`)."""
    return best_scale(res_dir, "local-l{x}", LOCAL_SCALES)


def tune_runs(res_dir: Path):
    """F0 on hetero seed 0's validation sets. Stage 1: `local` at each --local_lr_scale. Stage 2, once stage 1
    is in: each distilling method at the chosen local scale and each --distill_lr_scale."""
    res, val = res_root() / "tune", ["--eval_split", "val"]
    for x in LOCAL_SCALES:
        yield "hetero", "local", 0, val + ["--local_lr_scale", str(x)], res / f"local-l{x}-s0.json"
    loc = tuned_local_scale(res_dir)
    if loc is None:
        return
    for m in TUNE_METHODS:
        for x in TUNE_SCALES:
            yield ("hetero", m, 0, val + ["--local_lr_scale", str(loc), "--distill_lr_scale", str(x)],
                   res / f"{m}-l{loc}-x{x}-s0.json")


def tuned_scales(res_dir: Path) -> dict | None:
    """{method: (--local_lr_scale, --distill_lr_scale)} once F0 is in: every method takes stage 1's local
    scale; each distilling method the distillation scale with the highest SLM mean on the validation sets
    (ties to the larger scale); `random` takes lada's (the same loss), `local` has no distillation (1).
    None while a tuning run is missing."""
    loc = tuned_local_scale(res_dir)
    if loc is None:
        return None
    best = {m: best_scale(res_dir, f"{m}-l{loc}-x{{x}}", TUNE_SCALES) for m in TUNE_METHODS}
    if any(x is None for x in best.values()):
        return None
    best = {m: (loc, x) for m, x in best.items()}
    return dict(best, random=best["lada"], local=(loc, 1.0))


def followup_runs(scales: dict):
    """F1-F4: hetero on the fresh seeds, each method at its tuned scales; `random` after `lada` (its counts)."""
    res = res_root() / "followup"
    for seed in FOLLOWUP_SEEDS:
        for m in FOLLOWUP_METHODS:
            extra = ["--local_lr_scale", str(scales[m][0]), "--distill_lr_scale", str(scales[m][1])]
            if m == "random":
                extra += ["--counts_from", str(res / f"lada-s{seed}.json")]
            yield "hetero", m, seed, extra, res / f"{m}-s{seed}.json"


def v2_tune_runs():
    """v2's gamma on hetero seed 0's validation sets: lada at each gamma of V2_GAMMAS."""
    res = res_root() / "v2" / "tune"
    for g in V2_GAMMAS:
        yield "hetero", "lada", 0, ["--eval_split", "val"] + V2_FLAGS + ["--gamma", str(g)], res / f"lada-g{g}-s0.json"


def v2_gamma(res_dir: Path) -> float | None:
    """The gamma whose tuning run has the highest SLM mean on the validation sets (a tie to the larger
    gamma, the nearer to the default 1); None while a tuning run is missing."""
    return best_scale(res_dir, "lada-g{x}", V2_GAMMAS, sub="v2/tune")


def v2_runs(gamma: float, scenarios=("hetero",)):
    """v2's test runs on the fresh seeds at the chosen gamma; lada-random after lada (its counts)."""
    for scen in scenarios:
        res = res_root() / "v2" / scen
        for seed in V2_SEEDS:
            for m in V2_METHODS:
                extra = V2_FLAGS + (["--gamma", str(gamma)] if m.startswith("lada") else [])
                if m == "lada-random":
                    extra += ["--counts_from", str(res / f"lada-s{seed}.json")]
                yield scen, m, seed, extra, res / f"{m}-s{seed}.json"


def headroom_runs(seeds):
    res = res_root() / "headroom"
    for seed in seeds:
        for m in ("local", "oracle"):
            yield "hetero", m, seed, ["--eval_split", "val"], res / f"{m}-s{seed}.json"  # tuning reads no test set


def lock_path(dest: Path, workdir: Path) -> Path:
    return workdir / "locks" / (dest.relative_to(res_root()).as_posix().replace("/", "__") + ".lock")


def holder(dest: Path, workdir: Path) -> int | None:
    """The pid of the live process that holds the run's lock, or None."""
    try:
        pid = int(lock_path(dest, workdir).read_text().strip())
        os.kill(pid, 0)
        return pid
    except PermissionError:
        return pid  # alive, another user's
    except (ValueError, OSError):
        return None


def status(res_dir: Path, workdir: Path, seeds, scenarios, methods, v2_scenarios=("hetero",)) -> list[str]:
    """What of the whole comparison (v1's parts, then v2's) is done, running (a live process holds its
    lock) and still to do, and the hours left at the pace of the finished runs (`run_seconds`, as they
    ran: mostly two at a time): a run to do is estimated by the median of the finished runs of its
    method in the same folder (hetero, gap, tune, v2/hetero, ...), else of its method anywhere, else of
    all runs; a running run by that times the share of its rounds not yet in its log."""
    done = {}  # (folder, method) -> [seconds]
    for f in [*res_dir.glob("*/*.json"), *res_dir.glob("v2/*/*.json")]:
        r = json.loads(f.read_text())
        folder = f.parent.relative_to(res_dir).as_posix()
        done.setdefault((folder, r.get("config", {}).get("method", "")), []).append(run_seconds(r))
    every = [x for xs in done.values() for x in xs]

    def estimate(dest: Path, method: str) -> float:
        same = (done.get((dest.parent.relative_to(res_dir).as_posix(), method))
                or [x for (_, m), xs in done.items() if m == method for x in xs])
        return statistics.median(same or every or [0.0])

    loc = tuned_local_scale(res_dir)
    tune = list(tune_runs(res_dir))
    if loc is None:  # stage 2's local scale is not chosen yet: its runs counted under a placeholder name (no file, no lock)
        tune += [("hetero", m, 0, [], res_dir / "tune" / f"{m}-l?-x{x}-s0.json") for m in TUNE_METHODS for x in TUNE_SCALES]
    scales = tuned_scales(res_dir) or {m: (1.0, 1.0) for m in FOLLOWUP_METHODS}  # result files do not depend on them
    parts = {"headroom": headroom_runs(seeds), "grid": grid_runs(scenarios, methods, seeds),
             "follow-up F0": tune, "follow-up F1-F4": followup_runs(scales), "v2 gamma (validation)": v2_tune_runs()}
    for scen in v2_scenarios:  # the result files do not depend on the gamma chosen
        parts[f"v2 test ({scen})"] = v2_runs(v2_gamma(res_dir) or V2_GAMMAS[0], (scen,))
    rounds = {**config.BASE, **config.PRESETS[PRESET]}["rounds"]
    lines = ["| part | runs | done | running | to do | hours left (one process, at the finished runs' pace) |",
             "|---|---|---|---|---|---|"]
    running, total = [], 0.0
    for part, runs in parts.items():
        n = n_done = n_run = 0
        left = 0.0
        for scen, m, seed, extra, dest in runs:
            n += 1
            if dest.exists():
                n_done += 1
                continue
            est = estimate(dest, m)
            pid = holder(dest, workdir)
            if pid is None:
                left += est
                continue
            n_run += 1
            log = workdir / dest.relative_to(res_dir).with_suffix("") / "log.jsonl"
            got = len(log.read_text().splitlines()) if log.exists() else 0
            left += est * (1 - min(got, rounds) / rounds)
            running.append(f"- running: {dest.relative_to(res_dir)} (pid {pid}), {got} of {rounds} rounds in its log")
        total += left
        lines.append(f"| {part} | {n} | {n_done} | {n_run} | {n - n_done - n_run} | {left / 3600:.1f} |")
    lines.append(f"| all | | | | | {total / 3600:.1f} |")
    return lines + [""] + running


# -----------------------------------------------------------------------------
# Statistics: final per-problem correctness, paired differences, bootstrap intervals

def load(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def correct(res, party) -> np.ndarray:
    """0/1 per test problem of `party` after the last round (after warm-up if there was none)."""
    bits = res["rounds"][-1]["correct"][party] if res["rounds"] else res["initial_correct"][party]
    return np.frombuffer(bits.encode(), dtype=np.uint8) - ord("0")


def slms(res):
    return [p for p in res["initial_correct"] if not p.startswith("llm")]


def slm_accuracy(res) -> float:
    """Final accuracy (0-1) averaged over the run's SLMs, each on its own test problems."""
    return float(np.mean([correct(res, p).mean() for p in slms(res)]))


def bootstrap(d, n_boot=2000, seed=0):
    """(mean, lo, hi, n_seeds) in points of per-problem differences d[seed][party] (arrays): the mean
    over seeds of the mean over parties, and its 95% interval from a bootstrap that resamples seeds,
    then each party's problems within a seed."""
    rng = np.random.default_rng(seed)
    point = np.mean([np.mean([x.mean() for x in ds]) for ds in d])
    # draw[j][s]: n_boot resampled party-mean differences of seed s, for the j-th seed slot of a replicate
    # (independent across slots, so a seed drawn twice gets two independent problem resamples)
    draw = [[np.mean([x[rng.integers(0, len(x), (n_boot, len(x)))].mean(1) for x in d[s]], 0) for s in range(len(d))]
            for _ in range(len(d))]
    chosen = rng.integers(0, len(d), (n_boot, len(d)))
    boots = np.mean([np.array(draw[j])[chosen[:, j], np.arange(n_boot)] for j in range(len(d))], 0)
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return 100 * point, 100 * lo, 100 * hi, len(d)


def paired(runs_a, runs_b, parties, n_boot=2000, seed=0):
    """Mean over seeds and parties of accuracy(A) - accuracy(B), and its 95% interval from a bootstrap
    that resamples seeds, then each party's test problems within a seed. runs_x: {seed: results}.
    Returns (diff, lo, hi, n_seeds) in points, or None without a common seed."""
    seeds = sorted(set(runs_a) & set(runs_b))
    if not seeds:
        return None
    d = [[correct(runs_a[s], p).astype(float) - correct(runs_b[s], p) for p in parties(runs_a[s])] for s in seeds]
    if not all(d):  # e.g. no private-only domain in these runs
        return None
    return bootstrap(d, n_boot, seed)


def verdict(ci, direction=+1):
    """The pre-registered rule: supported if the 95% interval excludes 0 on the predicted side,
    contradicted if it excludes 0 on the other, else not decided."""
    if ci is None:
        return "not run"
    _, lo, hi, _ = ci
    lo, hi = (lo, hi) if direction > 0 else (-hi, -lo)
    return "supported" if lo > 0 else "contradicted" if hi < 0 else "not decided"


def fmt_ci(ci):
    return "–" if ci is None else f"{ci[0]:+.1f} [{ci[1]:+.1f}, {ci[2]:+.1f}]"


def runs_of(res_dir: Path, sub: str, name: str) -> dict:
    """{seed: results} of results/<preset>/<sub>/<name>-s<seed>.json (the name exactly: lada's are not
    lada-sft's)."""
    out = {}
    for p in sorted((res_dir / sub).glob(f"{name}-s*.json")):
        if (m := re.fullmatch(re.escape(name) + r"-s(\d+)", p.stem)):
            out[int(m[1])] = json.loads(p.read_text())
    return out


# -----------------------------------------------------------------------------
# Tables

def acc_cell(runs, party):
    xs = [100 * correct(r, party).mean() for r in runs.values() if party in r["initial_correct"]]
    if not xs:
        return "–"
    return f"{statistics.mean(xs):.1f} ± {statistics.stdev(xs):.1f}" if len(xs) > 1 else f"{xs[0]:.1f}"


def slm_mean(runs):
    xs = [100 * slm_accuracy(r) for r in runs.values()]
    return (f"{statistics.mean(xs):.1f} ± {statistics.stdev(xs):.1f}" if len(xs) > 1 else f"{xs[0]:.1f}") if xs else "–"


def run_seconds(r: dict) -> float:
    """A run's compute time from its own records: the set-up (warm-up, round-0 evaluation) and every
    round, the final evaluation included. Unlike the wall time of the last process, it counts the
    rounds a cut run did before it resumed."""
    return sum(r.get("seconds", {}).values()) + sum(x["seconds"] for x in r["rounds"])


def table(runs: dict, title: str) -> list[str]:
    """Final accuracy (mean ± std over seeds, %) of every party per method; warm-up row first."""
    any_run = next(iter(runs.values()))
    r0 = next(iter(any_run.values()))
    parties = list(r0["initial_correct"])
    warm = {s: dict(r, rounds=[]) for s, r in any_run.items()}
    cols = parties + ["SLM mean", "MB/round", "s/run"]
    sizes = ", ".join(f"{p} {len(r0['initial_correct'][p])}" for p in parties)
    n = sorted({len(rs) for rs in runs.values()})
    seeds = f"{n[0]} seed(s)" if len(n) == 1 else f"{n[0]}–{n[-1]} seeds per method, the warm-up row {len(any_run)}"
    md = [f"\n**{title}** ({seeds}; final accuracy %, mean ± std over seeds; problems per set: {sizes})\n",
          "| method | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for name, rs in [("after warm-up", warm)] + list(runs.items()):
        cells = [acc_cell(rs, p) for p in parties] + [slm_mean(rs)]
        mb = [sum(x["bytes"].values()) / 1e6 for r in rs.values() for x in r["rounds"]]
        secs = [run_seconds(r) for r in rs.values() if r["rounds"]]
        cells += [f"{statistics.mean(mb):.2f}" if mb else "–", f"{statistics.mean(secs):.0f}" if secs else "–"]
        md.append(f"| {name} | " + " | ".join(cells) + " |")
    return md


SLM = lambda r: slms(r)
LLM = lambda r: ["llm"]
LLM_PRIVATE = lambda r: [p for p in ("llm-private",) if p in r["initial_correct"]]


def method_rows(res_dir: Path, sub: str, tag: str, label: str) -> list:
    """H1-H4 (or the follow-up's F1-F4) of one results folder: (name, difference, ci, verdict) rows."""
    rows = []
    got = {m: runs_of(res_dir, sub, m) for m in ORDER}
    if not got["lada"]:
        return rows
    base = [m for m in BASELINES if got[m]]
    best = max(base, key=lambda m: np.mean([slm_accuracy(r) for r in got[m].values()]))
    ci = paired(got["lada"], got[best], SLM)
    rows.append((f"{tag}1 {label}", f"lada − best baseline ({best}), SLM mean", ci, verdict(ci)))
    if sub != "llm2slm":
        for who, sel in (("LLM, public test", LLM), ("LLM, private-only domain", LLM_PRIVATE)):
            ci = paired(got["lada"], got["local"], sel) if got["local"] else None
            rows.append((f"{tag}2 {label}", f"lada − local, {who}", ci, verdict(ci)))
    ci = paired(got["lada"], got["random"], SLM)
    rows.append((f"{tag}3 {label}", "lada − random at lada's counts, SLM mean", ci, verdict(ci)))
    ci = paired(got["lada"], got["lada-filter"], SLM)
    rows.append((f"{tag}4 {label}", "lada (DARD) − lada-filter (SFT), SLM mean", ci, verdict(ci)))
    return rows


def hypotheses(res_dir: Path) -> list[str]:
    """The pre-registered hypotheses (docs/study.md), each a paired difference with its interval and verdict."""
    rows = []
    for scen in SCENARIOS:
        rows += method_rows(res_dir, scen, "H", scen)
    gap = {(size, m): runs_of(res_dir, "gap", f"{size}-{m}") for size in ("mid", "large") for m in ("lada-loss", "lada")}
    if gap[("mid", "lada-loss")] and gap[("large", "lada-loss")]:
        ci = paired(gap[("mid", "lada-loss")], gap[("large", "lada-loss")], SLM)
        rows.append(("H5a one2one", "no filter (lada-loss): SLM from mid LLM − from large LLM", ci, verdict(ci)))
        if all(gap.values()):
            ci = gap_closing(gap)
            rows.append(("H5b one2one", "the filter closes it: (mid − large) with lada − (mid − large) with lada-loss",
                         ci, verdict(ci, -1)))
    rows += method_rows(res_dir, "followup", "F", "hetero, tuned lr")
    if not rows:
        return []
    md = ["\n**Hypotheses** (pre-registered in docs/study.md; paired difference of final accuracy in points, "
          "95% bootstrap interval over seeds and test problems; rule: supported if the interval excludes 0 on "
          "the predicted side)\n", "| | difference | estimate [95% CI] | seeds | verdict |", "|---|---|---|---|---|"]
    # the rule was registered for three seeds: with fewer, a verdict is shown as interim
    md += [f"| {h} | {what} | {fmt_ci(ci)} | {ci[3] if ci else 0} | "
           f"{v if ci is None or ci[3] >= len(SEEDS) else f'{v} (interim: {ci[3]} of {len(SEEDS)} seeds)'} |"
           for h, what, ci, v in rows]
    return md


def gap_closing(gap, n_boot=2000, seed=0):
    """Difference in differences of the SLM's final accuracy: (mid − large | lada) − (mid − large | lada-loss),
    each arm on its own test set of the same seed (one2one: one SLM), bootstrapped as in `paired`."""
    seeds = sorted(set.intersection(*(set(v) for v in gap.values())))
    vec = {k: [correct(v[s], "slm1").astype(float) for s in seeds] for k, v in gap.items()}
    dd = [vec[("mid", "lada")][i] - vec[("large", "lada")][i] - vec[("mid", "lada-loss")][i] + vec[("large", "lada-loss")][i]
          for i in range(len(seeds))]
    return bootstrap([[x] for x in dd], n_boot, seed)


def headroom(res_dir: Path):
    """The headroom table and its verdict: oracle must beat local by >= 10 points on the SLM mean (point
    estimate, interval above 0) and on the LLM's private-only domain (interval above 0)."""
    local, oracle = runs_of(res_dir, "headroom", "local"), runs_of(res_dir, "headroom", "oracle")
    if not (local and oracle):
        return [], None
    md = table({"local": local, "oracle": oracle}, "Headroom check (hetero, validation sets)")
    slm, priv = paired(oracle, local, SLM), paired(oracle, local, LLM_PRIVATE)
    ok = bool(slm is not None and slm[0] >= 10 and slm[1] > 0 and priv is not None and priv[1] > 0)
    md += ["", f"oracle − local: SLM mean {fmt_ci(slm)} points, LLM on the private-only domain {fmt_ci(priv)} "
               f"({slm[3] if slm else 0} seeds). Headroom: **{'yes' if ok else 'no'}** (needs ≥ 10 points on the SLM "
               "mean and both intervals above 0)."]
    return md, ok


def tables(res_dir: Path) -> str:
    md, _ = headroom(res_dir)
    for scen in SCENARIOS:
        runs = {m: runs_of(res_dir, scen, m) for m in ORDER}
        runs = {m: r for m, r in runs.items() if r}
        if runs:
            md += table(runs, scen)
    gap = {f"{size} LLM, {m}": runs_of(res_dir, "gap", f"{size}-{m}") for size in ("mid", "large") for m in ("lada-loss", "lada")}
    gap = {k: v for k, v in gap.items() if v}
    if gap:
        md += table(gap, "Learnability gap (one2one: the smallest SLM with a mid-size or the large LLM)")
    loc = tuned_local_scale(res_dir)
    tune = {f"local, local ×{x}": runs_of(res_dir, "tune", f"local-l{x}") for x in LOCAL_SCALES}
    tune.update({f"{m}, local ×{loc}, distill ×{x}": runs_of(res_dir, "tune", f"{m}-l{loc}-x{x}")
                 for m in TUNE_METHODS for x in TUNE_SCALES} if loc is not None else {})
    tune = {k: v for k, v in tune.items() if v}
    if tune:
        md += table(tune, "Follow-up F0: the learning rates (--local_lr_scale, then --distill_lr_scale), hetero seed 0, "
                          "validation sets")
        scales = tuned_scales(res_dir)
        md += ["", "Chosen (highest SLM mean): " + (
            f"local step ×{loc}; distillation " + ", ".join(f"{m} ×{scales[m][1]}" for m in TUNE_METHODS)
            + " (random: lada's)" if scales else "not yet (tuning runs missing)") + "."]
    followup = {m: runs_of(res_dir, "followup", m) for m in ORDER}
    followup = {m: r for m, r in followup.items() if r}
    if followup:
        md += table(followup, "Follow-up: hetero, seeds 3–5, each method at its learning rates from F0 (the local step's, then its distillation's; test sets)")
    md += hypotheses(res_dir)
    return "\n".join(md)


def v2_tables(res_dir: Path) -> str:
    """v2's tables (docs/study-v2.md): gamma on validation, the chosen gamma, the test runs, V1-V4."""
    md = []
    tune = {f"lada, gamma {g}": runs_of(res_dir, "v2/tune", f"lada-g{g}") for g in V2_GAMMAS}
    tune = {k: v for k, v in tune.items() if v}
    if tune:
        md += table(tune, "v2: gamma on hetero seed 0's validation sets (local ×0.3, distillation ×1.0)")
        g = v2_gamma(res_dir)
        md += ["", f"Chosen gamma (highest SLM mean on validation, ties to the larger): "
                   f"{g if g is not None else 'not yet (tuning runs missing)'}."]
    for scen in SCENARIOS:
        runs = {m: runs_of(res_dir, f"v2/{scen}", m) for m in V2_METHODS}
        runs = {m: r for m, r in runs.items() if r}
        if runs:
            md += table(runs, f"v2, {scen}: fresh seeds {', '.join(map(str, V2_SEEDS))}, test sets")
            md += v2_diagnostics(runs)
            md += v2_hypotheses(runs, scen)
    return "\n".join(md)


def v2_diagnostics(runs) -> list[str]:
    """Per method, summed over seeds, rounds and students: pairs by kind, and the mean Δ log p per token of
    y+ and y- against pi_ref (spec §4'), with the rounds where y+ fell below pi_ref."""
    md = ["", "| method | |H_k| | |A_k| | contrast | imitation | dropped | Δ log p/token y+ | Δ y- | y+ below π_ref |",
          "|---|---|---|---|---|---|---|---|---|"]
    for m, rs in runs.items():
        tot, dpos, dneg, below = {k: 0 for k in ("H", "A", "contrast", "imitation", "dropped")}, [], [], 0
        for r in rs.values():
            for x in r["rounds"]:
                for key, d in x.get("plugin", {}).items():
                    for k in tot:
                        tot[k] += d.get(k, 0)
                    if d.get("dlogp_pos") is not None:
                        dpos.append(d["dlogp_pos"])
                        below += d["dlogp_pos"] < 0
                    if d.get("dlogp_neg") is not None:
                        dneg.append(d["dlogp_neg"])
        if dpos or tot["H"]:
            f = lambda xs: f"{np.mean(xs):+.4f}" if xs else "–"  # noqa: E731
            md.append(f"| {m} | " + " | ".join(str(tot[k]) for k in tot) + f" | {f(dpos)} | {f(dneg)} | {below} |")
    return md if len(md) > 3 else []


def v2_hypotheses(runs, scen) -> list[str]:
    """V1-V4 of docs/study-v2.md: paired differences with 95% intervals and the registered verdicts."""
    got = {m: runs.get(m, {}) for m in V2_METHODS}
    if not got["lada"]:
        return ["", f"V1–V4, {scen}: not yet (no `lada` run)."]
    rows = []
    for tag, base, who, sel in (("V1", "fedmkt", "SLM mean", SLM), ("V2a", "fedmkt", "LLM, private-only domain", LLM_PRIVATE),
                                ("V3", "lada-random", "SLM mean (same counts)", SLM), ("V4", "lada-sft", "SLM mean (same picks)", SLM)):
        ci = paired(got["lada"], got[base], sel) if got[base] else None
        rows.append((tag, f"lada − {base}, {who}", ci, verdict(ci)))
    ci = paired(got["lada"], got["fedmkt"], LLM) if got["fedmkt"] else None  # non-inferiority, margin -2 points
    v = "not run" if ci is None else "supported" if ci[1] > -2 else "contradicted" if ci[2] < -2 else "not decided"
    rows.insert(2, ("V2b", "lada − fedmkt, LLM, public test (non-inferiority: margin −2)", ci, v))
    md = ["", f"**V1–V4, {scen}** (paired difference of final accuracy in points, 95% bootstrap interval over seeds "
              "and test problems; registered in docs/study-v2.md)", "",
          "| | difference | estimate [95% CI] | seeds | verdict |", "|---|---|---|---|---|"]
    md += [f"| {h} | {what} | {fmt_ci(ci)} | {ci[3] if ci else 0} | "
           f"{v if ci is None or ci[3] >= len(V2_SEEDS) else f'{v} (interim: {ci[3]} of {len(V2_SEEDS)} seeds)'} |"
           for h, what, ci, v in rows]
    return md


def write_tables(folder: Path, doc: str, tag: str, md: str):
    """Tables into <folder>/tables.md and between docs/<doc>'s `tables:<tag>` markers (results/ only:
    not with --results). ROOT is read at call time, so a test's ROOT is the one written."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tables.md").write_text(md + "\n")
    study = ROOT / "docs" / doc
    begin, end = f"<!-- tables:{tag}:begin -->", f"<!-- tables:{tag}:end -->"
    text = study.read_text() if study.exists() else ""
    if RESULTS is None and begin in text and end in text:
        head, rest = text.split(begin, 1)
        study.write_text(head + begin + "\n" + md + "\n" + end + rest.split(end, 1)[1])


def plot(res_dir: Path, scenario="hetero", methods=ORDER, sub=""):
    """SLM mean and LLM accuracy per round, mean over seeds (rounds before the last on the first
    eval_subset problems), of results/<preset>/<sub><scenario>/ into accuracy_<scenario>.png beside it."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    if not any(runs_of(res_dir, sub + scenario, m) for m in methods):
        return None
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    for m in methods:
        rs = list(runs_of(res_dir, sub + scenario, m).values())
        if not rs:
            continue
        curves = [[r["initial"]] + [x["accuracy"] for x in r["rounds"]] for r in rs]
        n = min(len(c) for c in curves)
        for ax, pick in zip(axes, (lambda a: np.mean([v for k, v in a.items() if not k.startswith("llm")]),
                                   lambda a: a["llm"], lambda a: a.get("llm-private", np.nan))):
            ax.plot(range(n), [100 * np.mean([pick(c[i]) for c in curves]) for i in range(n)], marker="o", label=m,
                    color=f"C{methods.index(m)}")  # one colour per method in every figure of a study
            ax.set_xticks(range(n))
    name = "follow-up (hetero, tuned lr)" if scenario == "followup" else f"v2, {scenario}" if sub else scenario
    for ax, t in zip(axes, ("SLMs (mean of own tests)", "LLM (public test)", "LLM (private-only domain)")):  # llm2slm: LLM frozen
        ax.set(xlabel="round", ylabel="accuracy (%)", title=f"{name}: {t}")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path = res_dir / sub / f"accuracy_{scenario}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def counts_of(extra) -> Path | None:
    """The lada result a `random` run takes its counts from (--counts_from), or None."""
    return Path(extra[extra.index("--counts_from") + 1]) if "--counts_from" in extra else None


def wait_for_others(blocked, workdir: Path):
    """Nothing this process can start now: wait while other processes run what it waits for."""
    print(f"compare.py: waiting for {len(blocked)} run(s) that other processes hold (looking again every "
          f"{POLL} s): {', '.join(show(t[-1]) for t in blocked[:3])}{' ...' if len(blocked) > 3 else ''}", flush=True)
    time.sleep(POLL)


def run_all(make_todo, workdir: Path, wait_for_held=False) -> list:
    """Run, in order, every run of make_todo() whose result file is missing, claiming each first (`claim`),
    and look again until none is left: the list is made again after each pass (F0's stage 2 appears once
    stage 1 is in; a `random` run starts once its lada counts are written). When nothing can start, wait
    while another live process holds the lada run a `random` waits for (or, with wait_for_held, any
    missing run: F0's stage 2 needs all of stage 1); otherwise stop, leaving held runs to their holders.
    Returns the runs left: held by others, or not runnable here (their counts come from a run not in the list)."""
    t0, n_ran = time.time(), 0
    while True:
        todo = [t for t in make_todo() if not t[-1].exists()]
        ran = False
        for scen, m, seed, extra, dest in todo:
            counts = counts_of(extra)
            if counts is not None and not counts.exists():
                continue  # its lada run comes first (this pass, a later one, or another process)
            lock = claim(dest, workdir)
            if lock is None:  # another process runs it
                continue
            if dest.exists():  # another process finished it since the list was made
                lock.unlink(missing_ok=True)
                continue
            left = sum(not t[-1].exists() for t in todo)
            if n_ran:
                eta = (time.time() - t0) / n_ran * left
                print(f"compare.py: {left} run(s) to do in this list, ETA {eta / 60:.0f} min at this process's pace", flush=True)
            try:
                run_one(scen, m, seed, extra, dest, workdir)
            finally:
                lock.unlink(missing_ok=True)
            ran, n_ran = True, n_ran + 1
        todo = [t for t in make_todo() if not t[-1].exists()]
        if not todo or ran:
            if not todo:
                print(f"compare.py: {n_ran} run(s) by this process in {time.time() - t0:.0f}s; none left", flush=True)
                return []
            continue
        held = [t for t in todo if holder(t[-1], workdir) is not None]
        blocked = [t for t in todo if (c := counts_of(t[3])) is not None and not c.exists()
                   and holder(c, workdir) is not None] + (held if wait_for_held else [])
        if not blocked:
            if held:
                print(f"compare.py: {len(held)} run(s) left to the other processes that hold them: "
                      f"{', '.join(show(t[-1]) for t in held)}", flush=True)
            if len(todo) > len(held):
                print(f"compare.py: {len(todo) - len(held)} run(s) left that this process cannot run (their counts "
                      f"come from runs not in its list): {', '.join(show(t[-1]) for t in todo if t not in held)}", flush=True)
            return todo
        wait_for_others(blocked, workdir)


def start_jobs(args, n: int) -> list:
    """n - 1 more compare.py processes on the same runs (`--worker`: they run, the first one builds the
    tables), each with cores / n threads; their output goes to WORKDIR/logs/job<i>.log."""
    threads = max(1, (os.cpu_count() or 1) // n)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    cmd = [sys.executable, str(ROOT / "study" / "compare.py"), "--worker", "--seeds", args.seeds, "--scenarios", args.scenarios,
           "--methods", args.methods, "--workdir", args.workdir, "--preset", args.preset]
    cmd += ["--results", args.results] if args.results else []
    cmd += [f"--{f}" for f in ("headroom", "tune", "followup", "force", "scenario_lada_loss", "v2") if getattr(args, f)]
    cmd += ["--v2-tune"] if args.v2_tune else []
    cmd += ["--v2-scenarios", args.v2_scenarios] if args.v2 else []
    logs = Path(args.workdir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    jobs = []
    for i in range(1, n):
        with open(logs / f"job{i}.log", "a") as log:
            jobs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
    print(f"compare.py: {n} processes, {threads} thread(s) each; the others' output: {logs}/job1..{n - 1}.log", flush=True)
    import torch
    torch.set_num_threads(threads)
    return jobs


def main(argv=None):
    global PRESET, RESULTS
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="comma-separated seeds")
    p.add_argument("--scenarios", default=",".join(SCENARIOS))
    p.add_argument("--methods", default=",".join(RUN_ORDER))
    p.add_argument("--headroom", action="store_true", help="run only the headroom check (oracle vs local)")
    p.add_argument("--tables", action="store_true", help="only rebuild tables, verdicts and plot from results/")
    p.add_argument("--status", action="store_true", help="only show what is done, running and to do, and the hours left")
    p.add_argument("--tune", action="store_true", help="run only the follow-up's tuning (F0, validation sets)")
    p.add_argument("--followup", action="store_true", help="run only the follow-up (F1-F4, seeds 3-5), after --tune")
    p.add_argument("--v2-tune", dest="v2_tune", action="store_true",
                   help="run only v2's gamma choice (lada at each gamma, hetero seed 0, validation sets)")
    p.add_argument("--v2", action="store_true", help="run only v2's test runs (fresh seeds 6-8), after --v2-tune")
    p.add_argument("--v2-scenarios", dest="v2_scenarios", default="hetero", help="scenarios of --v2 (hetero, then homo)")
    p.add_argument("--force", action="store_true", help="run the grid even if the headroom check failed")
    p.add_argument("--scenario_lada_loss", action="store_true",
                   help="also run lada-loss in the four scenarios, after everything else (about two hours a run)")
    p.add_argument("--jobs", type=int, default=1, help="processes that share the runs, each with cores / jobs threads "
                   "(a run uses one core well; warm-ups shared through the cache are done once)")
    p.add_argument("--workdir", default=None, help="run directories, the model cache and the locks "
                   "(default runs/compare, or runs/compare-PRESET for another preset)")
    p.add_argument("--preset", default=PRESET, choices=sorted(config.PRESETS),
                   help="every run's preset (testbed: the registered comparison; smoke: the pipeline in minutes)")
    p.add_argument("--results", default=None, help="where the result files go (default: results/, committed, for "
                   "testbed, whose tables in docs/study.md are rebuilt only from there; WORKDIR/results for another preset)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # one of --jobs' processes: no tables
    args = p.parse_args(argv)
    try:
        seeds = [int(x) for x in args.seeds.split(",")]
    except ValueError:
        seeds = None
    bad = (f"--jobs {args.jobs}: needs at least 1" if args.jobs < 1 else
           f"--seeds {args.seeds}: expected comma-separated integers" if seeds is None else None)
    if bad:
        print(f"compare.py: error: {bad}", file=sys.stderr)
        return 2
    PRESET = args.preset
    args.workdir = args.workdir or ("runs/compare" if PRESET == "testbed" else f"runs/compare-{PRESET}")
    if args.results is None and PRESET != "testbed":  # only the registered comparison's results are committed
        args.results = str(Path(args.workdir) / "results")
    RESULTS = Path(args.results).resolve() if args.results else None
    res_dir, workdir = res_root(), Path(args.workdir)
    if args.status:
        print("\n".join(status(res_dir, workdir, seeds, args.scenarios.split(","), args.methods.split(","),
                                args.v2_scenarios.split(","))))
        return 0
    make_todo = None
    if args.v2_tune or args.v2:
        gamma = v2_gamma(res_dir)
        if args.v2 and gamma is None:
            print("compare.py: v2's gamma is not chosen yet (run --v2-tune first: gamma is chosen on validation sets "
                  "before any v2 test set is read)", file=sys.stderr)
            return 2
        make_todo = ((lambda: v2_tune_runs()) if args.v2_tune else
                     (lambda: v2_runs(gamma, tuple(args.v2_scenarios.split(",")))))
    elif args.tune or args.followup:
        scales = tuned_scales(res_dir)
        if args.followup and scales is None:
            print("compare.py: the follow-up's tuning is not finished (run --tune first: the learning rates are "
                  "chosen on validation sets before any follow-up test set is read)", file=sys.stderr)
            return 2
        make_todo = (lambda: tune_runs(res_dir)) if args.tune else (lambda: followup_runs(scales))
    elif not args.tables:
        make_todo = lambda: headroom_runs(seeds)  # noqa: E731
        if not args.headroom:
            _, ok = headroom(res_dir)
            checked = set(runs_of(res_dir, "headroom", "local")) & set(runs_of(res_dir, "headroom", "oracle"))
            if not (ok and checked >= set(seeds)) and not args.force:
                why = "has not passed" if not ok else f"lacks seed(s) {sorted(set(seeds) - checked)} of the grid"
                print(f"compare.py: the headroom check {why} (run --headroom --seeds {args.seeds} first; without "
                      "headroom the testbed is wrong, not the method); --force runs the grid anyway", file=sys.stderr)
                return 2
            make_todo = lambda: grid_runs(args.scenarios.split(","), args.methods.split(","), seeds,  # noqa: E731
                                          args.scenario_lada_loss)
    if make_todo is not None:
        jobs = start_jobs(args, args.jobs) if args.jobs > 1 and not args.worker else []
        run_all(make_todo, workdir, wait_for_held=args.tune)
        failed = [i + 1 for i, j in enumerate(jobs) if j.wait() != 0]
        if failed:
            print(f"compare.py: process(es) {failed} of --jobs failed; see {workdir}/logs/job<i>.log", file=sys.stderr)
            return 1
        if args.worker:
            return 0
    md_v2 = v2_tables(res_dir)
    if md_v2:
        write_tables(res_dir / "v2", "study-v2.md", "v2", md_v2)
    for scen in SCENARIOS:  # v2's figures, one per scenario with test runs
        plot(res_dir, scen, V2_METHODS, "v2/")
    md = tables(res_dir)
    write_tables(res_dir, "study.md", PRESET, md)
    for scen in tuple(SCENARIOS) + ("followup",):  # one figure per scenario (and the follow-up) with runs
        plot(res_dir, scen)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
