"""What one round of DARD does to a testbed SLM, against SFT on the same pairs. A probe outside the
federated loop, on validation sets only (exploratory: written after the grid's first lada runs showed
the SLMs falling below `local`; it decides no hypothesis).

    python study/probes/dard_probe.py --cache DIR [--pairs 16,64] [flags of federated.py]

For each client k of the testbed (seed 0 unless --seed): the warmed-up LLM and SLM_k (from --cache),
a pool of public questions with the LLM's sampled path y+ and SLM_k's own sampled path y- for each
(temperature gen_temperature, as in the loop), the teacher targets q of spec §4 from the LLM's scores.
From the same start, with a fresh AdamW each time, SLM_k then trains on the first n pairs
(`--pairs`; distill_epochs passes of distill_batch, so 16 pairs = one lada round of 8 steps) under:
  sft           the loss of lada-filter and fedmkt (NLL of y+ per token + lam * L_local)
  dard          spec §4 as the loop runs it (beta, alpha, lam, lr of the preset)
  dard lr/10    the same at a tenth of the learning rate
  dard alpha=1  the same with ten times the weight of the NLL(y+) term
and reports: validation accuracy (graded as the preset says), the mean per-token log-prob of the
validation gold solutions, and the change of the mean per-token log-prob of the trained y+ and y-
and of SLM_k's own paths on held-out pool questions (what it samples, i.e. how it answers).
"""

import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import eval as ev  # noqa: E402
import config as C  # noqa: E402
import parties as F  # noqa: E402
import protocol as P  # noqa: E402
from distill import distill, make_optimizer, teacher_targets  # noqa: E402

HELD_OUT = 32


def per_token(cfg, party, qs, ys):
    lp, n = P.score(cfg, party, qs, ys)
    return float((lp / n.clamp_min(1)).mean())


def main():
    argv = sys.argv[1:]
    pairs = [int(s) for s in (argv[argv.index("--pairs") + 1] if "--pairs" in argv else "16,64").split(",")]
    if "--pairs" in argv:
        i = argv.index("--pairs")
        argv = argv[:i] + argv[i + 2:]
    cfg = C.resolve_config(C.parse_args(["--scenario", "hetero", "--preset", "testbed", "--device", "cpu"] + argv))
    splits = F.make_data(cfg, 3)
    parties = F.build_parties(cfg, splits)
    llm = parties["llm"]
    n_pool = max(pairs) + HELD_OUT
    qs = [p["question"] for p in random.Random(f"probe-{cfg['seed']}").sample(llm.public, n_pool)]
    y_llm, lp_llm, _ = P.paths_and_scores(cfg, llm, qs, 1)
    c_llm = P.correctness(llm, qs, y_llm)
    variants = {"sft": ("sft", {}), "dard": ("dard", {}), "dard lr/10": ("dard", {"lr": cfg["lr"] / 10}),
                "dard alpha=1": ("dard", {"alpha": 1.0})}
    print(f"seed {cfg['seed']}; pool {n_pool} questions; LLM paths correct: {int(c_llm.sum())}/{n_pool}; "
          f"spec defaults beta {cfg['beta']}, alpha {cfg['alpha']}, lam {cfg['lam']}, lr {cfg['lr']}, "
          f"{cfg['distill_epochs']} passes of {cfg['distill_batch']}", flush=True)
    for k, name in enumerate(n for n in parties if n != "llm"):
        s = parties[name]
        val = splits["clients"][k]["val"]
        vq, vgold = [p["question"] for p in val], [p["answer"] for p in val]
        y_k, _, _ = P.paths_and_scores(cfg, s, qs, 1000 * (k + 1))
        c_k = P.correctness(s, qs, y_k)
        lp_llm_yk, _ = P.score(cfg, llm, qs, y_k)
        q = teacher_targets(lp_llm, lp_llm_yk, P.chars(y_llm), P.chars(y_k), c_llm, c_k, cfg["tau"])
        start = {n: p.detach().clone() for n, p in s.model.state_dict().items()}
        hq, hy = qs[max(pairs):], y_k[max(pairs):]  # held-out questions and the SLM's own paths of them

        def measure():
            acc = ev.evaluate(s.model, s.tok, val, batch_size=cfg["eval_batch"], max_new_tokens=cfg["max_new_tokens"])
            return dict(acc=100 * acc[cfg["grading"]], gold=per_token(cfg, s, vq, vgold), own=per_token(cfg, s, hq, hy))

        base = measure()
        print(f"\n{name}: own paths correct {int(c_k.sum())}/{n_pool}, q = 1 for {int((q == 1).sum())}, "
              f"q > 0.9 for {int((q > 0.9).sum())}; after warm-up: validation {base['acc']:.1f}%, "
              f"gold log-prob/token {base['gold']:.3f}", flush=True)
        print("| pairs | loss | validation % | gold lp/token | Δ lp/token y+ | Δ lp/token y- | Δ lp/token own held-out |")
        print("|---|---|---|---|---|---|---|")
        for n in pairs:
            samples = [dict(question=qs[i], y_pos=y_llm[i], y_neg=y_k[i], q=float(q[i]), correct_pos=bool(c_llm[i]))
                       for i in range(n)]
            before_pos = per_token(cfg, s, qs[:n], y_llm[:n])
            before_neg = per_token(cfg, s, qs[:n], y_k[:n])
            for label, (loss, over) in variants.items():
                s.model.load_state_dict(start)
                c = dict(cfg, **over)
                opt = make_optimizer(s.model, c["lr"])
                distill(s.model, s.tok, opt, samples, s.local, loss, c, random.Random(k), cfg["device"])
                m = measure()
                print(f"| {n} | {label} | {m['acc']:.1f} | {m['gold']:.3f} | "
                      f"{per_token(cfg, s, qs[:n], y_llm[:n]) - before_pos:+.3f} | "
                      f"{per_token(cfg, s, qs[:n], y_k[:n]) - before_neg:+.3f} | {m['own'] - base['own']:+.3f} |",
                      flush=True)
        s.model.load_state_dict(start)


if __name__ == "__main__":
    main()
