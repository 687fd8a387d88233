"""compare.py: LaDa against its baselines in every scenario (spec §2's tables), several seeds.

    python compare.py --preset cpu --seeds 0,1,2          # run what is missing, then the tables
    python compare.py --preset cpu --tables               # only rebuild the tables from results/
    python compare.py --preset cpu --gap                  # the learnability-gap experiment

Each run is `federated.py` with one (scenario, method, seed); its results.json is copied to
results/<preset>/<scenario>/<method>-s<seed>.json (committed), so the tables and the plot are
regenerated from those files alone. A run whose file exists is skipped: an interrupted comparison
continues where it stopped. Hyperparameters are the spec's defaults, untuned (the README discloses
the one exception, the round learning rate). The seeds vary the rounds (pool draws, sampled paths, filter initialization); the data
and the warmed-up models are shared (`--data_seed 0`), so the spread over seeds measures the
federated phase alone.
"""
import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import federated

ROOT = Path(__file__).resolve().parent
METHODS = list(federated.METHODS)
BASELINES = ["local", "fedmkt", "random"]
ABLATIONS = ["lada-filter", "lada-loss"]


def run_one(preset, scenario, method, seed, extra, dest: Path, workdir: Path):
    out = workdir / f"{preset}-{scenario}-{method}-s{seed}{'-' + '-'.join(extra).replace('--', '') if extra else ''}"
    args = ["--preset", preset, "--scenario", scenario, "--method", method, "--seed", str(seed), "--out", str(out),
            "--cache", str(workdir / "cache"), "--data_seed", "0"] + extra + (["--resume"] if (out / "ckpt").exists() else [])
    if federated.main(args) != 0:
        raise SystemExit(f"compare.py: run failed: federated.py {' '.join(args)}")
    res = json.loads((out / "results.json").read_text())
    res["config"].pop("cache", None), res["config"].pop("out", None)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=1))
    os.replace(tmp, dest)


def final(res):
    """Final accuracy of every party: the LLM on the public test set, each SLM on its own."""
    return res["rounds"][-1]["accuracy"] if res["rounds"] else res["initial"]


def fmt(xs):
    if not xs:
        return "–"
    m = 100 * statistics.mean(xs)
    return f"{m:.1f} ± {100 * statistics.stdev(xs):.1f}" if len(xs) > 1 else f"{m:.1f}"


def tables(res_dir: Path) -> str:
    """Markdown: per scenario, final accuracy (mean ± std over seeds) per method and party; best in bold."""
    md = []
    for scen in federated.SCENARIOS:
        runs = {m: [json.loads(p.read_text()) for p in sorted((res_dir / scen).glob(f"{m}-s*.json"))] for m in METHODS}
        runs = {m: r for m, r in runs.items() if r}
        if not runs:
            continue
        parties = list(final(next(iter(runs.values()))[0]))
        mean = {m: {p: statistics.mean(final(r)[p] for r in rs) for p in parties} for m, rs in runs.items()}
        avg = {m: statistics.mean(mean[m][p] for p in parties if p != "llm") for m in runs}
        cols = parties + ["SLM mean", "MB/round", "s/round"]
        md += [f"\n**{scen}** ({len(next(iter(runs.values())))} seed(s); accuracy %, mean ± std; LLM on the public "
               f"test set, each SLM on its own)\n", "| method | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
        for m, rs in runs.items():
            cells = []
            for p in parties:
                c = fmt([final(r)[p] for r in rs])
                best = max(mean[k][p] for k in runs)
                cells.append(f"**{c}**" if mean[m][p] == best else c)
            c = fmt([statistics.mean(final(r)[p] for p in parties if p != "llm") for r in rs])
            cells.append(f"**{c}**" if avg[m] == max(avg.values()) else c)
            mb = [sum(x["bytes"].values()) / 1e6 for r in rs for x in r["rounds"]]
            sec = [x["seconds"] for r in rs for x in r["rounds"]]
            cells += [f"{statistics.mean(mb):.2f}" if mb else "–", f"{statistics.mean(sec):.0f}" if sec else "–"]
            md.append(f"| {m} | " + " | ".join(cells) + " |")
        base = [m for m in BASELINES if m in runs]
        if "lada" in runs and base:
            best_b = max(base, key=lambda m: avg[m])
            md.append(f"\nLaDa vs the best baseline ({best_b}) on the SLM mean: {100 * (avg['lada'] - avg[best_b]):+.1f} points; "
                      f"LLM: {100 * (mean['lada']['llm'] - max(mean[m]['llm'] for m in base)):+.1f} points.")
    gap = sorted((res_dir / "gap").glob("*.json"))
    if gap:
        md += ["\n**Learnability gap** (one2one: the smallest SLM distilled from a mid-size or the large LLM; "
               "final SLM accuracy %, mean ± std)\n",
               "| LLM | parameters | LLM after warm-up | SLM after warm-up | no filter (lada-loss) | filter (lada) |",
               "|---|---|---|---|---|---|"]
        for size in ("mid", "large"):
            rs = {m: [json.loads(p.read_text()) for p in gap if p.name.startswith(f"{size}-{m}-s")] for m in ("lada-loss", "lada")}
            r0 = rs["lada"][0] if rs["lada"] else rs["lada-loss"][0]
            cell = lambda m: fmt([final(r)["slm1"] for r in rs[m]])
            md.append(f"| {size} | {r0['parties']['llm']['params'] / 1e6:.2f} M | {100 * r0['initial']['llm']:.0f}% | "
                      f"{100 * r0['initial']['slm1']:.0f}% | {cell('lada-loss')} | {cell('lada')} |")
    return "\n".join(md)


def plot(res_dir: Path, scenario="hetero"):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for m in METHODS:
        rs = [json.loads(p.read_text()) for p in sorted((res_dir / scenario).glob(f"{m}-s*.json"))]
        if not rs:
            continue
        accs = [[r["initial"]] + [x["accuracy"] for x in r["rounds"]] for r in rs]
        n = min(len(a) for a in accs)
        slm = [statistics.mean(statistics.mean(v for k, v in a[i].items() if k != "llm") for a in accs) for i in range(n)]
        llm = [statistics.mean(a[i]["llm"] for a in accs) for i in range(n)]
        axes[0].plot(range(n), [100 * x for x in slm], marker="o", label=m)
        axes[1].plot(range(n), [100 * x for x in llm], marker="o", label=m)
        for ax in axes:
            ax.set_xticks(range(n))
    for ax, t in zip(axes, ("SLMs (mean of own test sets)", "LLM (public test set)")):
        ax.set(xlabel="round", ylabel="accuracy (%)", title=f"{scenario}: {t}")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path = res_dir / f"accuracy_{scenario}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="cpu", choices=list(federated.PRESETS))
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    p.add_argument("--scenarios", default=",".join(federated.SCENARIOS))
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--tables", action="store_true", help="only rebuild tables and plot from results/")
    p.add_argument("--gap", action="store_true", help="also run the learnability-gap experiment")
    p.add_argument("--workdir", default="runs/compare", help="run directories and the model cache")
    args = p.parse_args(argv)
    res_dir = ROOT / "results" / args.preset
    if not args.tables:
        seeds = [int(s) for s in args.seeds.split(",")]
        t0 = time.time()
        for seed in seeds:
            for scen in args.scenarios.split(","):
                for m in args.methods.split(","):
                    if m == "fedavg" and scen != "homo":  # FedAvg needs one architecture
                        continue
                    dest = res_dir / scen / f"{m}-s{seed}.json"
                    if not dest.exists():
                        run_one(args.preset, scen, m, seed, [], dest, Path(args.workdir))
            if args.gap:
                for size in ("mid", "large"):
                    for m in ("lada-loss", "lada"):
                        dest = res_dir / "gap" / f"{size}-{m}-s{seed}.json"
                        if not dest.exists():
                            run_one(args.preset, "one2one", m, seed, ["--llm_size", size], dest, Path(args.workdir))
        print(f"comparison runs done in {time.time() - t0:.0f}s")
    md = tables(res_dir)
    (res_dir / "tables.md").write_text(md + "\n")
    plot(res_dir)
    readme = ROOT / "README.md"  # the tables also go between the README's markers for this preset
    begin, end = f"<!-- tables:{args.preset}:begin -->", f"<!-- tables:{args.preset}:end -->"
    text = readme.read_text()
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        readme.write_text(head + begin + "\n" + md + "\n" + end + rest.split(end, 1)[1])
    print(md)


if __name__ == "__main__":
    sys.exit(main())
