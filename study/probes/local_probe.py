"""What the local step (spec §2 step 1) does to a warmed-up testbed SLM on its own. A probe outside
the federated loop, on validation sets only (exploratory: written after hetero's three seeds showed
`local` falling from 11-14% after warm-up to 3-6% in round 1; it decides no hypothesis).

    python study/probes/local_probe.py --cache DIR [--seed S] [flags of federated.py]

For each client k of the testbed: the warmed-up SLM_k (from --cache), then five rounds of the local
step (local_steps AdamW steps of local_batch on its own private data, one optimizer over the rounds,
as `local` runs it) under each variant, from the same start:
  loop          the preset's lr (AdamW, fresh at round 1), as the grid runs it
  lr/10         a tenth of it
  lr ramp       the preset's lr, reached linearly over the first local_steps steps (Adam's first
                steps move every weight by about lr whatever its gradient)
and reports the validation accuracy (graded as the preset says) after rounds 1 and 5, the mean
per-token log-prob of the validation gold solutions, and the training loss on the private data.
"""

import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

import config as C  # noqa: E402
import parties as F  # noqa: E402
import runs  # noqa: E402
import protocol as P  # noqa: E402
from distill import local_batch_loss, make_optimizer, optimizer_step  # noqa: E402


def gold_per_token(cfg, party):
    ex = next(iter(party.evals.values()))
    lp, n = P.score(cfg, party, [e["question"] for e in ex], [e["answer"] for e in ex])
    return float((lp / n.clamp_min(1)).mean())


def main():
    cfg = C.resolve_config(C.parse_args(["--scenario", "hetero", "--preset", "testbed", "--device", "cpu",
                                         "--eval_split", "val"] + sys.argv[1:]))
    splits = F.make_data(cfg, 3)
    parties = F.build_parties(cfg, splits, only=["slm1", "slm2", "slm3"])
    print(f"seed {cfg['seed']}; {cfg['local_steps']} local steps of {cfg['local_batch']} a round, lr {cfg['lr']}; "
          f"validation sets; accuracy %, gold log-prob per token, private-data loss", flush=True)
    print("| SLM | private problems | variant | acc after warm-up | after round 1 | after round 5 | "
          "gold log p/token: warm-up, r1, r5 | local loss r1, r5 |")
    print("|---|---|---|---|---|---|---|---|")
    for name in ("slm1", "slm2", "slm3"):
        s = parties[name]
        start = {k: v.clone() for k, v in s.model.state_dict().items()}
        acc0 = runs.evaluate(cfg, s, 0)["accuracy"][name]
        g0 = gold_per_token(cfg, s)
        for variant in ("loop", "lr/10", "lr ramp"):
            s.model.load_state_dict(start)
            lr = cfg["lr"] / 10 if variant == "lr/10" else cfg["lr"]
            opt = make_optimizer(s.model, lr)
            sched = (torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, (t + 1) / cfg["local_steps"]))
                     if variant == "lr ramp" else None)
            rng = random.Random(f"local-probe-{cfg['seed']}-{name}")
            accs, golds, losses = [], [], []
            for rnd in range(1, 6):
                loss = local_round(s, opt, sched, cfg, rng)
                if rnd in (1, 5):
                    accs.append(runs.evaluate(cfg, s, cfg["rounds"])["accuracy"][name])
                    golds.append(gold_per_token(cfg, s))
                    losses.append(loss)
            print(f"| {name} | {len(s.local)} | {variant} | {100 * acc0:.1f} | {100 * accs[0]:.1f} | {100 * accs[1]:.1f} "
                  f"| {g0:.3f}, {golds[0]:.3f}, {golds[1]:.3f} | {losses[0]:.3f}, {losses[1]:.3f} |", flush=True)


def local_round(s, opt, sched, cfg, rng) -> float:
    """distill.local_sft's round, step for step (the same batches from the same rng), with an lr schedule."""
    batches = s.local.batches(cfg["local_batch"], rng)
    s.model.train()
    tot = 0.0
    for _ in range(cfg["local_steps"]):
        loss = local_batch_loss(s.model, s.local, batches, cfg["device"])
        optimizer_step(s.model, opt, loss)
        if sched is not None:
            sched.step()
        tot += float(loss.detach())
    s.model.eval()
    return tot / cfg["local_steps"]


if __name__ == "__main__":
    main()
