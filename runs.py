"""runs.py: a run's bookkeeping around the round: its output folder, evaluations, checkpoints (the
last finished round, written atomically; --resume continues from it), the round's log line and the
report (results.json, results.md, accuracy.png).
"""
import json
import math
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import transformers

import config
import eval as ev
import messages as M
from distill import autocast
from lora import is_lora, load_adapters
from models import fingerprint, load_model
from store import (StateError, atomic_dir, check_manifest, commit_link, crash_point, load_state, lock_out, remove_stale,
                   save_state, write_manifest)

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


def evaluate(cfg, party, rnd) -> dict:
    """Greedy accuracy of the party's model on each of its evaluation sets: {"accuracy", "strict",
    "eval_n", "correct"}, each {key: value}. Rounds before the last read the first eval_subset
    problems; round 0 and the last read all, and give each problem's 0/1 (a string, "correct") for
    paired comparisons."""
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


def has_checkpoint(out: Path) -> bool:
    return (out / "ckpt").is_symlink() or (out / "ckpt").exists()


def checkpoint_view(parties: dict) -> tuple[dict, dict, dict, dict]:
    """(models, tokenizers, optimizers, filters) of every party: what a checkpoint holds."""
    filters = {}
    for n, p in parties.items():
        filters.update({(f"down/{n}" if k == "down" else k): f for k, f in p.filters.items()})
    return ({n: p.model for n, p in parties.items()}, {n: p.tok for n, p in parties.items()},
            {n: p.opt for n, p in parties.items()}, filters)


def open_run(cfg):
    """The output directory (owned by this process: `lock_out`; a finished round there needs --resume,
    whose flags are checked against the checkpoint's before any other work), the config printed first,
    the seed and the device settings. Returns (out, amp, release): amp is the autocast context of cfg's
    dtype, release() gives the folder back."""
    out = Path(cfg["out"])
    out.mkdir(parents=True, exist_ok=True)
    release = lock_out(out)  # first: a folder a live run holds is "in use", whatever it holds yet
    try:
        if has_checkpoint(out) and not cfg["resume"]:
            raise ValueError(f"{out} already holds a run; add --resume to continue it, or choose another --out")
        if cfg["resume"] and has_checkpoint(out):
            check_resume(out, cfg)
    except Exception:
        release()
        raise
    print(json.dumps(cfg), flush=True)
    torch.manual_seed(cfg["seed"])
    if cfg["device"].startswith("cuda"):  # TF32 wherever fp32 matmuls remain (the optimizer's master weights stay fp32)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return out, autocast(cfg["device"], cfg["dtype"]), release  # under bf16: warm-up, local steps, distillation, ...


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


class RoundLog:
    """What one round records (its line of log.jsonl): each step's seconds (`phase`), the bytes each
    way, each student's picks, rewards, losses and v2 diagnostics, and the clients that failed and were
    skipped. A client's report (`client_report`) lands under that client's own keys only."""

    def __init__(self, rnd: int, dev: str):
        self.rnd, self.dev, self.t0 = rnd, dev, time.time()
        self.traffic, self.selected, self.rewards, self.losses, self.errors, self.times, self.plugin = ({} for _ in range(7))
        self.evals = {}  # client -> the evaluation it sent with its round's last reply (Flower)

    def count_down(self, msgs: dict):
        """Check and count what the server sends: {client: {kind: message}} (messages.send)."""
        for down in msgs.values():
            for kind, m in down.items():
                M.send(m, kind, self.traffic, "down")

    def accept(self, stage: str, msgs: dict, raw: dict, cfg) -> dict:
        """The server's side of a stage's replies, whatever carried them: raw {client: (report, {kind:
        message})} -> {client: {kind: message}} of the clients whose replies pass every check (the kinds
        the stage expects, each message's schema, FedAvg's weights, the report: messages.receive_report).
        A client whose reply fails is skipped for the rest of the round; the server never raises on it."""
        expect = {"local": {"weights"}, "answer": {"client_paths"}, "learn": set()}[stage]
        replies = {}
        for n, (report, up) in raw.items():
            try:
                want = expect if stage != "answer" or "pool" in msgs[n] else set()
                if not isinstance(up, dict) or set(up) != want:
                    raise M.BadMessage(f"'{stage}' must answer with {sorted(want)}, got {sorted(map(str, up)) if isinstance(up, dict) else type(up).__name__}")
                for kind, m in up.items():
                    M.send(m, kind, self.traffic, "up")
                if "client_paths" in up:  # the server's check of a reply before any use
                    up["client_paths"] = M.receive(up["client_paths"], "client_paths", len(msgs[n]["pool"]["questions"]), cfg)
                report, notes = M.receive_report(report, n, cfg["pool_size"])
                for note in notes:
                    print(f"round {self.rnd}: {note}", file=sys.stderr, flush=True)
                self.learned(n, "down", report)
                if "eval" in report:
                    self.evals[n] = report["eval"]
                replies[n] = up
            except Exception as e:
                self.skip(n, e)
        if stage == "local":  # FedAvg's weights: keys, shapes, dtypes, finite values (messages.receive_weights)
            ok, bad = M.receive_weights({n: up["weights"] for n, up in replies.items()})
            for n, e in bad.items():
                self.skip(n, e)
                del replies[n]
            for n, sd in ok.items():
                replies[n] = {"weights": {"state_dict": sd}}
        return replies

    def phase(self, name: str):
        return phase(self.times, name, self.dev)

    def skip(self, name: str, e: Exception):
        """A failing client (or a refused message) is logged and skipped; the round goes on."""
        self.errors[name] = f"{type(e).__name__}: {e}"
        print(f"round {self.rnd}: client {name} failed and is skipped ({self.errors[name]})", file=sys.stderr, flush=True)

    def per_client(self, names, fn) -> dict:
        """{name: fn(name)} for each client in `names`, a failing one skipped (`skip`)."""
        out = {}
        for n in names:
            try:
                out[n] = fn(n)
            except Exception as e:
                self.skip(n, e)
        return out

    def learned(self, student: str, direction: str, got: dict):
        """What a student's distillation step reports: {"losses", "selected", "reward", "plugin"} (any of them),
        kept under `student` (losses) and `direction`/`student` (picks, reward, diagnostics)."""
        self.losses.update({f"{k}/{student}": v for k, v in got.get("losses", {}).items()})
        key = f"{direction}/{student}"
        if "selected" in got:
            self.selected[key] = got["selected"]
        if got.get("reward") is not None:
            self.rewards[key] = got["reward"]
        if got.get("plugin"):
            self.plugin[key] = got["plugin"]

    def entry(self, evals: dict) -> dict:
        entry = {"round": self.rnd, "accuracy": evals["accuracy"], "strict": evals["strict"], "eval_n": evals["eval_n"],
                 "correct": evals["correct"], "selected": self.selected, "reward": self.rewards,
                 "loss": {k: v for k, v in self.losses.items() if not (isinstance(v, float) and math.isnan(v))},
                 "bytes": self.traffic, "errors": self.errors, "seconds": round(time.time() - self.t0, 1),
                 "phases": self.times}
        if self.plugin:  # v2 (spec §4'): per student and direction |H_k|, |A_k|, pairs by kind, Δ log p per token
            entry["plugin"] = self.plugin
            entry["warnings"] = [f"{k}: y+ fell below pi_ref ({d['dlogp_pos']:+.4f} nats/token; DPOP's failure mode)"
                                 for k, d in self.plugin.items() if (d.get("dlogp_pos") or 0.0) < 0]
        return entry


# -----------------------------------------------------------------------------
# Checkpoints and the report

def save_checkpoint(out, cfg, rnd, models, toks, opts, filters, results):
    """Everything needed to continue after round `rnd`: weights (safetensors), optimizer and filter
    states (store.save_state: safetensors + JSON, no pickle), results and config. Written into a
    temporary directory, then published in one step: out/ckpt becomes a link to out/ckpt.rNNNN
    (store.commit_link), so out/ckpt is always a whole round, however the process dies."""
    tmp = atomic_dir(out / "ckpt")
    for n, m in models.items():
        m.save_pretrained(str(tmp / n), safe_serialization=True)
        toks[n].save_pretrained(str(tmp / n))
    crash_point("checkpoint")  # weights written, states not yet
    save_state({"round": rnd, "opts": {n: o.state_dict() for n, o in opts.items()},
                "filters": {k: f.state_dict() for k, f in filters.items()}}, tmp / "state")
    (tmp / "results.json").write_text(json.dumps(results, indent=1))
    (tmp / "config.json").write_text(json.dumps(cfg, indent=1))
    write_manifest(tmp)  # every file's SHA-256, checked on load
    commit_link(tmp, out / "ckpt", f"r{rnd:04d}")


NEUTRAL = ("cache", "device", "out", "rewarm")  # flags that change where a run works, not its results


def check_resume(out: Path, cfg):
    """Before any data, warm-up or cache work: the checkpoint in `out` was made with these flags (all but
    --rounds, which extends a run, and the result-neutral cache, device and output paths); ValueError
    naming the keys that differ."""
    ck = out / "ckpt"
    saved = _read_json(ck / "config.json")
    if not isinstance(saved, dict):
        raise StateError(f"{ck / 'config.json'}: not an object")
    saved = {**{k: v for k, v in config.BASE.items() if k not in saved}, **saved}  # keys added since: their defaults
    skip = set(config.RUN_KEYS) | set(NEUTRAL)
    diff = sorted(k for k in set(saved) | set(cfg) if k not in skip and saved.get(k, config.BASE.get(k)) != cfg.get(k))
    if diff:
        raise ValueError(f"{ck} was made with a different config ({', '.join(f'{k}={saved.get(k)!r}' for k in diff)}); "
                         "use another --out or the same flags")


def check_optimizer(o, name: str, ck: Path):
    """The optimizer state just loaded fits the model: every per-parameter tensor has its parameter's
    shape (a moved or swapped tensor would fail at the first step, or train the wrong weights)."""
    params = [p for g in o.param_groups for p in g["params"]]
    if len(o.state) > len(params):
        raise StateError(f"{ck / 'state.json'}: the optimizer of {name} holds {len(o.state)} states for {len(params)} parameters")
    for i, p in enumerate(params):
        for key, v in o.state.get(p, {}).items():
            if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape != p.shape:
                raise StateError(f"{ck / 'state.json'}: the optimizer of {name}: '{key}' of parameter {i} is "
                                 f"{list(v.shape)}, the parameter {list(p.shape)}")


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
    ck = out / "ckpt"
    if not ck.is_dir():
        raise ValueError(f"{ck}: not a checkpoint directory (a link to a missing one?)")
    if ck.is_symlink():
        remove_stale(ck)  # what a killed save left: never loaded
    if (ck / "state.pt").exists():
        raise StateError(f"{ck / 'state.pt'}: a pickled state (written by an older version); it is not loaded, "
                         "since unpickling can run code: continue with that version or start a new --out")
    check_resume(out, cfg)
    check_manifest(ck)
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
    for n, o in opts.items():
        check_optimizer(o, n, ck)
    if "config" in results:
        results["config"] = cfg  # the resumed run's flags (--rounds may extend it), never what the file says
    return rnd, results


def summary(results) -> str:
    """What a run prints at its end: each party's accuracy after warm-up and after the last round (and
    the problems it was read on), the bytes sent, the time, and what to run next."""
    last = results["rounds"][-1] if results["rounds"] else None
    cfg = results["config"]
    lines = [f"{'party':<12}{'after warm-up':>15}{'after round ' + str(last['round']) if last else '':>17}   problems"]
    for n, a0 in results["initial"].items():
        a1 = f"{100 * last['accuracy'][n]:.1f}%" if last and n in last["accuracy"] else "–"
        lines.append(f"{n:<12}{100 * a0:>14.1f}%{a1:>17}   {len(results['initial_correct'].get(n, ''))}")
    sent = {d: sum(r["bytes"].get(d, 0) for r in results["rounds"]) / 1e6 for d in ("down", "up")}
    setup, rounds = sum(results["seconds"].values()), sum(r["seconds"] for r in results["rounds"])
    lines.append(f"sent {sent['down']:.2f} MB down, {sent['up']:.2f} MB up in {len(results['rounds'])} round(s); "
                 f"{setup + rounds:.0f} s ({setup:.0f} s warm-up and round-0 evaluation, {rounds:.0f} s rounds)")
    base = "fedmkt" if cfg["method"].startswith("lada") else "lada"
    lines.append(f"next: python federated.py --scenario {cfg['scenario']} --method {base}  (the same run with "
                 f"{'the host LaDa plugs into' if base == 'fedmkt' else 'LaDa'}); what such numbers mean: docs/study.md")
    return "\n".join(lines)


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
