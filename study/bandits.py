"""bandits.py: synthetic contextual bandits with a known optimum, to measure what the filter buys.

    python study/bandits.py --plot results/filter/demo.png     # ~2 min on a 2-core CPU

The demo prints the mean expected reward of the picks per round for the filter (f1 + f2 as spec §3.2),
the filter with `optimism` (EE-Net's passed-over targets, filter.LearnabilityFilter.update), f1 alone
(greedy), random picks and the oracle (top-budget by true expected reward), on a linear and a nonlinear
bandit and on two bandits built so that a greedy learner gets stuck. On "ripening" (samples that become
learnable after round 1) f1 alone stays stuck and the spec's f2 does not free it, optimism does (+0.06
and +0.10 per pick on two sets of 15 seeds); it costs 0.03 on the bandits where greedy does fine. On
"deceptive" nothing we tried frees it, random exploration included. Numbers and what was tried: make_bandit.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project's modules
from filter import FEATURE_DIM, LearnabilityFilter  # noqa: E402  the repo's filter.py (spec §3)

# -----------------------------------------------------------------------------
# synthetic contextual bandits whose expected reward μ is known


def make_bandit(kind, seed, m=FEATURE_DIM, e=16, blobs=6):
    """Returns draw(n, gen, t=0) -> (features Tensor[n, m], embeddings Tensor[n, e], mu Tensor[n]) for round t
    (0-based; only "ripening" changes with it).

    z ~ N(0, 1) per feature, embeddings from `blobs` Gaussian clusters; the filter sees the features as
    z · scale + offset (different per feature, so standardization matters).
    linear:    μ = clip(0.5 + 0.2 a·[z, emb/2], 0, 1)
    nonlinear: μ = 0.5 + 0.45 cos(1.5 a·[z, emb/2]) tanh(b·[z, emb/2])
    jackpot:   95% of samples: μ = 0.6 σ(−2 z0); 5%: z1 ≈ 3 (beyond the rest) and μ = 0.95, so a greedy
               learner that has not seen one has no reason to try them. Over 15 seeds (100..114) the
               filter and f1 alone tie here (filter − f1 = −0.004 ± 0.012 mean reward, rounds 2..15):
               f2 does not find the jackpot more often than f1 does. Not a real trap: f1 alone finds the
               jackpots by itself on most seeds (f1 0.66 ± 0.04 against the oracle's 0.86, seeds 100..109).
    ripening:  a trap for a greedy learner, the way LaDa's reward moves: samples the student cannot learn
               from yet and can after one round. Outside blob 0, μ = 0.5 + 0.15 tanh(a·[z, emb/2]); in
               blob 0, μ = 0.1 in round 1 and 0.9 from round 2 on. Round 1's k-means picks in blob 0 earn
               ~0.1, so f1 scores blob 0 far below its picks and never looks again.
               Rounds 2..15, seeds 100..109 (where the variants below were chosen): f1 alone 0.618 ±
               0.044, random 0.570, oracle 0.900; the spec's filter 0.611 (filter − f1 −0.007 ± 0.020);
               optimism 0.6 (the kept one) +0.063 ± 0.061 over f1 (8 of 10 seeds). Fresh seeds 200..214:
               f1 0.638 ± 0.066, filter 0.618 ± 0.054, optimism 0.734 ± 0.061, +0.096 ± 0.065 over f1
               (14 of 15), random 0.581, oracle 0.900.
               Variants, gain over f1 on seeds 100..109 / cost on linear seeds 0..9: optimism 0.8 +0.083
               / −0.051 (0.6: −0.033; nonlinear −0.033 and −0.043); the passed-over targets every round,
               20 of them, not scaled by the shortfall, c = 0.2 / 0.4 / 0.6: +0.032 / +0.050 / +0.060 and
               −0.045 (c = 0.3) / −0.063 / −0.109; the same with c / t^0.5 or c / t in round t +0.044 /
               +0.034 (5 of 10 seeds) and −0.023 / −0.009; the 20 passed-over samples farthest from the
               picks, c = 0.4, +0.043 / −0.049; a randomized prior in f2 (f2 = tanh(net + β·fixed random
               net), Osband et al. 2018) β = 0.3 / 1: −0.026 / +0.001, redrawn every round −0.009.
               Reference, not a filter: replacing the 3 lowest-scored of f1's 20 picks by random samples
               (ε-greedy, run_bandit policy "eps") +0.107 ± 0.057 (10 of 10) and −0.043 on linear:
               random exploration buys more here than the exploration net does.
               Fresh seeds, optimism − f1: linear (10..19) −0.031 ± 0.013, nonlinear (10..19) −0.032 ±
               0.019, deceptive (200..209) −0.022 ± 0.025.
    deceptive: a trap for a greedy learner that nothing we tried frees. Outside blob 0,
               μ = 0.5 − 0.15 tanh(z0); in blob 0, μ = 0.95 where z0 > 0.5 and 0 elsewhere. Round 1's
               k-means picks in blob 0 are mostly zeros and the other blobs teach "high z0 is bad", so
               after round 1 f1 scores blob 0's good half at ~0.1 against ~0.6 for its picks and never
               tries it. Over 15 seeds (100..114, rounds
               2..15): filter 0.595 ± 0.029, f1 alone 0.596 ± 0.023, random 0.469 ± 0.014, oracle
               0.875 ± 0.016; filter − f1 = −0.001 ± 0.019. The exploration net does not free it, and
               neither does random exploration: policy "eps" with EPS_PICKS = 2 / 5 of the 20 picks random
               0.591 / 0.583 against f1's 0.593 (seeds 100..109): the good half is 5% of a pool and contradicts
               everything else f1 has seen, so a few random finds do not move it.
               Also tried, filter − f1 over seeds 100..107 (each against f1 trained the same way):
               f2 on EE-Net's residual of the f1 that made the pick −0.015 (with f1 trained online on
               each round's picks only); f2 also taught +0.2 / +0.4 on a sample of the pool left out
               (the optimism of EE-Net's code) −0.001 / −0.029; f2 output ×5 −0.010; f2 on |r − f1|
               +0.015 ± 0.027 (5 of 8 seeds). The optimistic f2 does score the never-tried good half
               higher than the picks (+0.33 against +0.26), but f1's gap there is ~0.5.
               f2 on out-of-fold residuals (see update), filter − f1 over seeds 100..114 then fresh
               seeds 200..214: r − f1_fold −0.009 ± 0.015 (4 of 15 seeds better), −0.017 ± 0.016
               (2 of 15); |r − f1_fold| +0.002 ± 0.025 (7 of 15), −0.002 ± 0.027 (5 of 15); K = 2
               +0.001 ± 0.029 (7 of 15, seeds 100..114). Signed, f2 turns negative nearly everywhere
               (seeds 100..102 after 6 rounds: −0.06…−0.14 outside blob 0, −0.07…−0.59 on its zeros,
               −0.06…−0.26 on its good half), so it adds noise, not optimism; and the good half is
               never in the history, so no residual of either sign reaches it. On seeds 0..9 (rounds
               2..15), against the filter as it is: linear −0.040 ± 0.018 / −0.022 ± 0.021, nonlinear
               −0.050 ± 0.035 / −0.040 ± 0.032 (signed / absolute, worse on all 10 seeds each).
    """
    g = torch.Generator().manual_seed(1000 + seed)
    offset, scale = 3 * torch.randn(m, generator=g), 0.1 + 4 * torch.rand(m, generator=g)
    centers = 2 * torch.randn(blobs, e, generator=g)
    a, b = torch.randn(m + e, generator=g), torch.randn(m + e, generator=g)
    a, b = a / a.norm(), b / b.norm()

    def draw(n, gen, t=0):
        z = torch.randn(n, m, generator=gen)
        blob = torch.randint(blobs, (n,), generator=gen)
        emb = centers[blob] + torch.randn(n, e, generator=gen)
        zc = torch.cat([z, emb / 2], 1)  # about unit scale
        if kind == "linear":
            mu = (0.5 + 0.2 * zc @ a).clamp(0, 1)
        elif kind == "nonlinear":
            mu = 0.5 + 0.45 * torch.cos(1.5 * zc @ a) * torch.tanh(zc @ b)
        elif kind == "jackpot":
            jack = torch.rand(n, generator=gen) < 0.05
            z[jack, 1] = 3 + 0.3 * torch.randn(int(jack.sum()), generator=gen)
            mu = torch.where(jack, 0.95, 0.6 * torch.sigmoid(-2 * z[:, 0]))
        elif kind == "deceptive":
            mu = torch.where(blob == 0, 0.95 * (z[:, 0] > 0.5).float(), 0.5 - 0.15 * torch.tanh(z[:, 0]))
        elif kind == "ripening":
            mu = torch.where(blob == 0, 0.1 if t == 0 else 0.9, 0.5 + 0.15 * torch.tanh(zc @ a))
        else:
            raise ValueError(kind)
        return z * scale + offset, emb, mu
    return draw


OPTIMISM = 0.6  # the `optimism` of the demo's and the tests' "optimism" policy (chosen on ripening, see make_bandit)
LEARNERS = {"filter": dict(), "optimism": dict(optimism=OPTIMISM), "f1": dict(explore=False),
            "eps": dict(explore=False)}  # eps: f1 with its EPS_PICKS lowest-scored picks replaced by random ones
EPS_PICKS = 3


def run_bandit(kind, policy, seed, rounds=15, pool=300, budget=20, noise=0.1):
    """Mean μ of the picks per round; reward = clip(μ + N(0, noise²)). policy: "filter" (f1 + f2 as in spec
    §3.2), "optimism" (the same with optimism=OPTIMISM), "f1" (f1 alone, greedy), "eps" (f1 with ε-greedy
    picks after round 1, a yardstick for exploration), "random" or "oracle"."""
    draw, gen = make_bandit(kind, seed), torch.Generator().manual_seed(seed)
    eps_gen = torch.Generator().manual_seed(seed + 999)
    filt = None
    if policy in LEARNERS:
        filt = LearnabilityFilter(FEATURE_DIM, 16, budget, budget, seed=seed, **LEARNERS[policy])
    out = []
    for t in range(rounds):
        x, emb, mu = draw(pool, gen, t)
        if filt is not None:
            idx = filt.select(x, emb)
            if policy == "eps" and t > 0:
                keep, rest = idx[:budget - EPS_PICKS], torch.ones(pool, dtype=torch.bool)
                rest[keep] = False
                rest = rest.nonzero().squeeze(1)
                idx = torch.cat([keep, rest[torch.randperm(len(rest), generator=eps_gen)[:EPS_PICKS]]])
        elif policy == "random":
            idx = torch.randperm(pool, generator=gen)[:budget]
        else:
            idx = mu.topk(budget).indices
        r = (mu[idx] + noise * torch.randn(len(idx), generator=gen)).clamp(0, 1)
        if filt is not None:
            filt.update(x[idx], emb[idx], r)
        out.append(mu[idx].mean().item())
    return out


def demo(seeds=(0, 1, 2), rounds=15, plot=None):
    """Print, per bandit, the mean expected reward of each policy's picks per round; with `plot`, also
    draw the curves there (needs matplotlib)."""
    import platform
    import time
    print(f"bandits.py  torch {torch.__version__}  {platform.processor() or platform.machine()}  "
          f"{time.strftime('%Y-%m-%d %H:%M')}  seeds {list(seeds)}, pool 300, budget 20, reward noise 0.1")
    print(f"policies: filter = f1 + f2 (spec §3.2), optimism = the same with optimism={OPTIMISM}, "
          "f1 = f1 alone (greedy), random, oracle (top 20 by true μ)")
    policies, curves = ["filter", "optimism", "f1", "random", "oracle"], {}
    kinds = ["linear", "nonlinear", "ripening", "deceptive"]
    for kind in kinds:
        runs = {p: torch.tensor([run_bandit(kind, p, s, rounds) for s in seeds]).mean(0) for p in policies}
        curves[kind] = runs
        print(f"\n{kind}: mean expected reward of the picks per round (mean over seeds)")
        print("round " + "".join(f"{p:>10}" for p in policies))
        for t in range(rounds):
            print(f"{t + 1:5d} " + "".join(f"{runs[p][t].item():10.3f}" for p in policies))
        avg = {p: runs[p][1:].mean().item() for p in policies}  # round 1 is k-means for the learners
        gap = lambda p: (avg[p] - avg["random"]) / (avg["oracle"] - avg["random"])
        print("2..%-2d " % rounds + "".join(f"{avg[p]:10.3f}" for p in policies))
        print("share of the random→oracle gap closed: " + ", ".join(f"{p} {gap(p):.2f}" for p in policies[:3]))
    if plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, axes = plt.subplots(1, len(kinds), figsize=(4 * len(kinds), 3.2), sharey=True)
        for ax, kind in zip(axes, kinds):
            for p in policies:
                dashed = p in ("random", "oracle")
                ax.plot(range(1, rounds + 1), curves[kind][p].tolist(), label=p, ls="--" if dashed else "-")
            ax.set(title=kind, xlabel="round")
        axes[0].set_ylabel(f"mean μ of the picks ({len(seeds)} seeds)")
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(plot, dpi=110)
        plt.close(fig)
        print(f"\nplot: {plot}")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        print(f"bandits.py: error: {message}", file=sys.stderr)
        sys.exit(2)


def main(argv=None):
    p = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=15, help="bandit rounds per run")
    p.add_argument("--plot", help="also draw the reward curves into this image file (needs matplotlib)")
    args = p.parse_args(argv)
    if args.rounds < 2:  # round 1 is k-means for the learners; the table averages rounds 2..
        p.error(f"--rounds must be >= 2, got {args.rounds}")
    if args.plot and not os.path.isdir(os.path.dirname(os.path.abspath(args.plot))):
        p.error(f"--plot: directory not found: {os.path.dirname(args.plot)}")
    demo(rounds=args.rounds, plot=args.plot)


if __name__ == "__main__":
    main()
