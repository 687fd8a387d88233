"""by_steps.py: accuracy by the number of steps of a problem, from the committed runs' records.

    python study/probes/by_steps.py --scenario hetero > results/testbed/probes/by_steps_hetero.txt

Reads no test set again: every final run keeps each test problem's 0/1 (`initial_correct`, the last
round's `correct`), and the splits are regenerated from the run's own config (data.make_splits is
seeded), so each 0/1 is matched with its problem. A step is one `<<a op b = c>>` line of the gold
solution; the private-only domain's convention line (data.CONVENTIONS) is not counted, and that
domain has its own columns. Pooled over the seeds there are: each cell is accuracy % (problems).
"""
import argparse
import collections
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import data as D  # noqa: E402
import parties as F  # noqa: E402


def column(example) -> str:
    """'shared 2' / 'time 3': the domain group and the problem's steps (its convention line not counted)."""
    n = example["answer"].count("<<")
    if example["domain"] in D.CONVENTIONS:
        return f"{example['domain']} {n - 1}"
    return f"shared {n}"


def table(scenario, methods, seeds):
    """{(row label, party): {steps: [hits, n]}} over the seeds there are."""
    out = collections.defaultdict(lambda: collections.defaultdict(lambda: [0, 0]))
    used = collections.defaultdict(list)
    for seed in seeds:
        splits = None
        for method in methods:
            path = ROOT / "results" / "testbed" / scenario / f"{method}-s{seed}.json"
            if not path.exists():
                continue
            r = json.loads(path.read_text())
            if splits is None:
                splits = F.make_data(r["config"], sum(k.startswith("slm") for k in r["initial"]))
            used[method].append(seed)
            sets = {f"slm{k + 1}": c["test"] for k, c in enumerate(splits["clients"])}
            sets["llm"] = splits["public_test"]
            rows = [(method, r["rounds"][-1]["correct"])]
            if method == methods[0]:
                rows.insert(0, ("after warm-up", r["initial_correct"]))
            for label, correct in rows:
                for party, examples in sets.items():
                    bits = correct.get(party)
                    if bits is None:
                        continue
                    assert len(bits) == len(examples), (path, party)
                    for e, b in zip(examples, bits):
                        cell = out[(label, party)][column(e)]
                        cell[0] += b == "1"
                        cell[1] += 1
    return out, used


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenario", default="hetero")
    ap.add_argument("--methods", default="local,fedmkt,random,lada-filter,lada")
    ap.add_argument("--seeds", default="0,1,2")
    a = ap.parse_args()
    methods = a.methods.split(",")
    out, used = table(a.scenario, methods, [int(s) for s in a.seeds.split(",")])
    all_steps = sorted({s for cells in out.values() for s in cells}, key=lambda c: (c.split()[0] != "shared", c))
    parties = sorted({p for _, p in out})
    print(f"# {a.scenario}: final accuracy % (problems) by domain group and steps, pooled over seeds; runs: "
          + ", ".join(f"{m} s{','.join(map(str, s))}" for m, s in used.items()))
    for party in parties:
        print(f"\n{party}\n| | " + " | ".join(all_steps) + " |")
        print("|---|" + "---|" * len(all_steps))
        for label in ["after warm-up"] + methods:
            cells = out.get((label, party))
            if not cells:
                continue
            print(f"| {label} | " + " | ".join(
                f"{100 * cells[s][0] / cells[s][1]:.1f} ({cells[s][1]})" if s in cells else "–" for s in all_steps) + " |")


if __name__ == "__main__":
    main()
