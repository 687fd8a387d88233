"""filter.py: the model learnability-aware data filter of LaDa (spec §3).

A neural contextual bandit in the style of EE-Net (Ban et al., ICLR 2022, arXiv 2110.03177), one per
(client, direction), living with the student:
- `sample_features`      the context φ of a sample from four log-probs and two correctness bits (§3.1)
- `project_embeddings`   fixed random projection of the student's mean-pooled hidden state (§3.1)
- `learnability_reward`  r = clip(1 − ppl_after / ppl_before, 0, 1) · correct(y_t) (§3.3)
- `LearnabilityFilter`   f1 (exploitation) + f2 (exploration): select / update / state_dict (§3.2)

Synthetic bandits with a known optimum that measure what the filter buys: bandits.py.
"""
import copy
import functools
import math

import torch
import torch.nn as nn
from torch.func import functional_call, grad, vmap

# -----------------------------------------------------------------------------
# §3.1 the context of a sample (student s, teacher t, sent path y_t, own path y_s)

FEATURE_NAMES = [
    "nll_s_yt",      # NLL of y_t under the student, per character
    "nll_t_yt",      # NLL of y_t under the teacher, per character
    "gap_yt",        # nll_s_yt − nll_t_yt: the learnability gap
    "nll_s_ys",      # NLL of y_s under the student, per character
    "nll_t_ys",      # NLL of y_s under the teacher, per character
    "correct_yt",    # 1 if y_t ends in the gold answer
    "correct_ys",    # 1 if y_s ends in the gold answer
    "log_chars_yt",  # log of the length of y_t in characters
]
FEATURE_DIM = len(FEATURE_NAMES)  # 8; the embedding (embed_dim) is passed separately


def sample_features(logp_s_yt, logp_t_yt, logp_s_ys, logp_t_ys, chars_t, chars_s, correct_t, correct_s):
    """The context features of spec §3.1 without the embedding; every argument is Tensor[n].

    logp_*: summed natural-log probability of a whole path (≤ 0) under the student s or teacher t, each
    under its own tokenizer; chars_*: length of y_t / y_s in characters; correct_*: 0/1.
    Returns Tensor[n, FEATURE_DIM] (float32) in the order of FEATURE_NAMES. NLLs are per character so
    that scores from different tokenizers compare (§3.1).
    """
    f = lambda v: torch.as_tensor(v, dtype=torch.float32)
    c_t, c_s = f(chars_t).clamp(min=1), f(chars_s).clamp(min=1)
    nll_s_yt, nll_t_yt = -f(logp_s_yt) / c_t, -f(logp_t_yt) / c_t
    nll_s_ys, nll_t_ys = -f(logp_s_ys) / c_s, -f(logp_t_ys) / c_s
    return torch.stack([nll_s_yt, nll_t_yt, nll_s_yt - nll_t_yt, nll_s_ys, nll_t_ys,
                        f(correct_t), f(correct_s), torch.log(c_t)], dim=1)


def project_embeddings(hidden_mean, embed_dim=16, seed=0):
    """Fixed Gaussian projection (§3.1): Tensor[n, h] mean-pooled hidden states -> Tensor[n, embed_dim].

    R ~ N(0, 1/embed_dim)^(h × embed_dim) is drawn from `seed` alone, so every call with the same (h, seed)
    uses the same R; the 1/sqrt(embed_dim) scale keeps norms about equal (Johnson–Lindenstrauss).
    """
    gen = torch.Generator().manual_seed(seed)
    R = torch.randn(hidden_mean.shape[1], embed_dim, generator=gen) / math.sqrt(embed_dim)  # (h, e)
    return hidden_mean.float() @ R.to(hidden_mean.device)


def learnability_reward(nll_before, nll_after, correct):
    """Spec §3.3: r = clip(1 − exp(ℓ_after − ℓ_before), 0, 1) · correct(y_t), i.e. 1 − ppl_after/ppl_before.

    nll_before, nll_after: Tensor[k], per-token NLL of y_t under the student before / after this round's
    distillation; correct: Tensor[k], 0/1 correctness of y_t. Returns Tensor[k] in [0, 1].
    """
    f = lambda v: torch.as_tensor(v, dtype=torch.float32)
    return (1 - torch.exp(f(nll_after) - f(nll_before))).clamp(0, 1) * f(correct)

# -----------------------------------------------------------------------------
# §3.2 the filter


def _single_thread(fn):
    """Run fn with one intra-op thread, then restore the caller's setting: the filter's nets are tiny,
    and on a busy CPU more threads make their many small ops tens of times slower."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        n = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(n)
    return wrapped


def _mlp(d_in, hidden, out_act, gen):
    """d_in -> hidden -> 1 MLP; PyTorch's default uniform bounds, drawn from `gen` (never the global RNG)."""
    net = nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, 1), out_act)
    with torch.no_grad():
        for lin in (net[0], net[2]):
            bound = 1 / math.sqrt(lin.in_features)
            lin.weight.uniform_(-bound, bound, generator=gen)
            lin.bias.uniform_(-bound, bound, generator=gen)
    return net


def kmeans_pick(x, k, gen, iters=25):
    """Round 1 of §3.2: k-means++ seeding then Lloyd on x: Tensor[n, e]; returns LongTensor[k], the
    sample nearest each centroid. Centroids are visited in order and a taken sample is skipped, so the
    picks are distinct."""
    n = x.shape[0]
    if k >= n:
        return torch.arange(n)
    x = x.double()
    C = x[torch.randint(n, (1,), generator=gen)]  # (1, e)
    for _ in range(1, k):  # k-means++: next centroid drawn with probability ∝ squared distance
        d2 = torch.cdist(x, C).min(1).values ** 2  # (n,)
        p = d2 / d2.sum() if d2.sum() > 0 else torch.full((n,), 1.0 / n, dtype=x.dtype)
        C = torch.cat([C, x[torch.multinomial(p, 1, generator=gen)]])
    for _ in range(iters):  # Lloyd
        assign = torch.cdist(x, C).argmin(1)  # (n,)
        counts = torch.bincount(assign, minlength=k).unsqueeze(1).to(x.dtype)  # (k, 1)
        sums = torch.zeros_like(C).index_add_(0, assign, x)
        C_new = torch.where(counts > 0, sums / counts.clamp(min=1), C)  # an empty cluster keeps its centroid
        if torch.allclose(C_new, C):
            break
        C = C_new
    dist = torch.cdist(C, x)  # (k, n)
    taken, picks = torch.zeros(n, dtype=torch.bool), []
    for j in range(k):
        i = int(dist[j].masked_fill(taken, float("inf")).argmin())
        taken[i] = True
        picks.append(i)
    return torch.tensor(picks, dtype=torch.long)


class LearnabilityFilter:
    """The EE-Net-style filter of spec §3.2.

    φ = standardize([features, embedding]) with running per-dimension statistics (§3.1).
    f1(φ; θ1) ∈ [0, 1] predicts the reward; f2(g(φ); θ2) ∈ [−1, 1] predicts the residual r − f1(φ), where
    g(φ) = ∇θ1 f1(φ), block-mean-pooled to ≤ grad_dim entries and scaled to unit L2 norm.
    Score u = f1 + f2, or u = f1 with explore=False (the greedy ablation).
    reward_scale="q90": the nets learn r / q90(positive rewards so far), clipped to 1, so that the
    fixed threshold means "a gain near the best seen" whatever the scale of the raw rewards (the
    learnability gains of one round of distillation are a few percent; raw, no prediction ever
    reaches 0.5 and every pick falls back to min_budget).
    optimism > 0 [ours, after EE-Net's code]: f2 also learns the residual target +optimism on samples
    that select() passed over, as many per round as the picks fell short of reward 1 (see update). The
    spec's f2 learns only from picked samples, so it cannot raise a sample unlike every pick; this can.

    Once per round: idx = filt.select(features, embeddings); ...distil on idx...;
    filt.update(features[idx], embeddings[idx], rewards).
    Everything runs on CPU in float32; inputs on another device are copied.
    """

    def __init__(self, feature_dim, embed_dim, budget, min_budget, threshold=0.5, hidden=64, epochs=10,
                 seed=0, lr=1e-2, grad_dim=256, batch_size=32, explore=True, reward_scale=None, optimism=0.0):
        assert 1 <= min_budget <= budget, "need 1 <= min_budget <= budget"
        assert reward_scale in (None, "q90"), "reward_scale: None or 'q90'"
        assert 0.0 <= optimism <= 1.0, "optimism: a residual target in [0, 1]"
        self.config = dict(feature_dim=feature_dim, embed_dim=embed_dim, budget=budget, min_budget=min_budget,
                           threshold=threshold, hidden=hidden, epochs=epochs, seed=seed, lr=lr,
                           grad_dim=grad_dim, batch_size=batch_size, explore=explore, reward_scale=reward_scale,
                           optimism=optimism)
        self.budget, self.min_budget, self.threshold = budget, min_budget, threshold
        self.epochs, self.batch_size, self.explore, self.optimism = epochs, batch_size, explore, optimism
        self.gen = torch.Generator().manual_seed(seed)  # the filter's only RNG: init, k-means, shuffles
        d = feature_dim + embed_dim
        self.f1 = _mlp(d, hidden, nn.Sigmoid(), self.gen)  # exploitation net: reward in [0, 1]
        self.n_params = sum(p.numel() for p in self.f1.parameters())  # P, 1665 for d=24, hidden=64
        self.block = math.ceil(self.n_params / grad_dim)  # parameters averaged into one entry of g
        self.grad_dim = math.ceil(self.n_params / self.block)  # ≤ grad_dim (238 for P=1665)
        self.f2 = _mlp(self.grad_dim, hidden, nn.Tanh(), self.gen)  # exploration net: residual in [-1, 1]
        self.opt1 = torch.optim.Adam(self.f1.parameters(), lr=lr)
        self.opt2 = torch.optim.Adam(self.f2.parameters(), lr=lr)
        # running mean / sum of squared deviations of [features, embedding], float64 (Chan et al. merge)
        self.count, self.mean, self.m2 = 0, torch.zeros(d, dtype=torch.float64), torch.zeros(d, dtype=torch.float64)
        # reward history: raw contexts (re-standardized at every update) and rewards
        self.hist = dict(features=torch.zeros(0, feature_dim), embeddings=torch.zeros(0, embed_dim),
                         rewards=torch.zeros(0))
        # the last pool's samples that select() passed over (kept only with optimism > 0, used by the next update)
        self.passed = dict(features=torch.zeros(0, feature_dim), embeddings=torch.zeros(0, embed_dim))

    # --- context

    def _fold_stats(self, x):
        """Merge the rows of x: Tensor[n, d] into the running mean and variance."""
        x = x.double()
        n, mu = x.shape[0], x.mean(0)
        tot, delta = self.count + n, mu - self.mean
        self.m2 = self.m2 + ((x - mu) ** 2).sum(0) + delta ** 2 * self.count * n / tot
        self.mean = self.mean + delta * n / tot
        self.count = tot

    def _phi(self, features, embeddings):
        """φ: Tensor[n, m+e], the standardized [features, embedding]. The std is floored at 1e-3 and z
        clipped to ±5, so a feature that has been constant so far cannot blow up."""
        x = torch.cat([features, embeddings], 1)
        if self.count == 0:
            return x
        std = (self.m2 / max(self.count - 1, 1)).sqrt().clamp(min=1e-3)
        return ((x.double() - self.mean) / std).clamp(-5, 5).float()

    def _grad_features(self, phi):
        """g(φ): Tensor[n, m+e] -> Tensor[n, grad_dim]. Per-sample ∇θ1 f1(φ) in one vmap over
        torch.func.grad (~50 ms for n=2000 on CPU), then block means and L2 normalization (as EE-Net)."""
        params = {k: v.detach() for k, v in self.f1.named_parameters()}
        f1_one = lambda p, x: functional_call(self.f1, p, (x.unsqueeze(0),)).squeeze()
        g = vmap(grad(f1_one), in_dims=(None, 0))(params, phi)  # dict of (n, *param.shape)
        g = torch.cat([g[k].reshape(phi.shape[0], -1) for k in params], 1)  # (n, P)
        pad = self.grad_dim * self.block - self.n_params  # the last block is short: zero-pad, divide by its size
        pool = lambda t: nn.functional.pad(t, (0, pad)).view(t.shape[0], self.grad_dim, self.block).sum(2)
        g = pool(g) / pool(torch.ones(1, self.n_params))  # (n, grad_dim)
        return g / (g.norm(dim=1, keepdim=True) + 1e-12)

    @torch.no_grad()
    def _score(self, phi):
        """(f1, f2): Tensor[n] each; f2 is zero with explore=False."""
        f1 = self.f1(phi).squeeze(1)
        if not self.explore:
            return f1, torch.zeros_like(f1)
        with torch.enable_grad():
            g = self._grad_features(phi)
        return f1, self.f2(g).squeeze(1)

    @_single_thread
    def scores(self, features, embeddings):
        """(f1, f2): Tensor[n] each, for inspection and logging; changes no state. u = f1 + f2."""
        return self._score(self._phi(*self._inputs(features, embeddings)))

    @staticmethod
    def _inputs(*ts):
        """float32 CPU copies; a NaN/inf (e.g. a −inf log-prob) must not poison the running statistics."""
        return [torch.nan_to_num(torch.as_tensor(t).detach().float().cpu(), posinf=1e4, neginf=-1e4) for t in ts]

    # --- selection (§3.2)

    @_single_thread
    def select(self, features, embeddings):
        """Pick from a pool: features Tensor[n, m], embeddings Tensor[n, e] -> LongTensor of distinct indices.

        No reward history yet: k-means (k = min(budget, n)) on the embeddings, the sample nearest each
        centroid. Afterwards: every x with u(x) ≥ threshold, cut to `budget` and padded to `min_budget`,
        both by top u, returned in descending u. The pool is scored with the statistics the nets were
        trained with and then folded into the running statistics (pools are unbiased draws of the
        contexts; the picks are not)."""
        features, embeddings = self._inputs(features, embeddings)
        n = features.shape[0]
        if n == 0:
            return torch.zeros(0, dtype=torch.long)
        if len(self.hist["rewards"]) == 0:
            idx = kmeans_pick(embeddings, min(self.budget, n), self.gen)  # round 1 [paper: initial clustering]
        else:
            f1, f2 = self._score(self._phi(features, embeddings))
            u = f1 + f2  # §3.2: u(x) = f1(φ) + f2(∇f1)
            order = torch.sort(u, descending=True, stable=True).indices
            k = int((u >= self.threshold).sum())
            k = min(max(min(k, self.budget), self.min_budget), n)  # clip to budget, pad to min_budget
            idx = order[:k]
        if self.explore and self.optimism > 0:
            rest = torch.ones(n, dtype=torch.bool)
            rest[idx] = False
            self.passed = dict(features=features[rest], embeddings=embeddings[rest])
        self._fold_stats(torch.cat([features, embeddings], 1))
        return idx

    # --- learning (§3.2, last bullet)

    @_single_thread
    def update(self, features, embeddings, rewards):
        """Add the picked samples' rewards and retrain both nets on all history (`epochs` epochs each,
        squared loss, Adam). features Tensor[k, m], embeddings Tensor[k, e], rewards Tensor[k] in [0, 1].

        f1 trains on (φ, r). Then f2 trains on (g(φ), r − f1(φ)) with g and the residual taken at the f1
        just trained, i.e. the f1 that scores the next pool: f2 learns where that f1 is still off.
        (EE-Net instead keeps, for each sample, the residual of the f1 that picked it. With 10 epochs
        over all history per round f1 moves far between rounds, and those stale targets cost ~0.02 mean
        reward against f1 alone on our linear and nonlinear bandits (6 seeds, every seed worse), where
        this version is within ±0.01 of f1 alone. An [ours] choice: docs/choices.md.)
        These in-sample residuals are small (f1 has fitted those very samples: f2's outputs have std
        ~0.02). Out-of-fold residuals were tried (commit df62896: K = 5 fixed folds, each with a copy
        of f1 from the same init never trained on its fold; f2 on (g under the full f1, r − f1_fold)):
        f2 grows to std 0.06–0.25 yet buys nothing on "deceptive" and costs reward on the linear and
        nonlinear bandits; numbers in bandits.make_bandit.
        optimism > 0: the shortfall Σ(1 − r) of this round's picks (r as f1 learns it), rounded, is the number
        of the last pool's passed-over samples, drawn at random, that f2 also learns with target +optimism.
        EE-Net's code does this per pick: after a reward of 0, every arm not picked gets residual +0.2;
        with rewards in {0, 1} the two agree up to the size of the bonus. We use 0.6 (bandits.OPTIMISM), chosen on
        "ripening" seeds 100..109 among 0.2–0.9 and variants (numbers in bandits.make_bandit)."""
        features, embeddings, rewards = self._inputs(features, embeddings, rewards)
        if features.shape[0] == 0:
            return
        if self.count == 0:  # update() before any select(): the statistics start from these contexts
            self._fold_stats(torch.cat([features, embeddings], 1))
        new = dict(features=features, embeddings=embeddings, rewards=rewards.reshape(-1))
        self.hist = {k: torch.cat([self.hist[k], new[k]]) for k in self.hist}
        phi = self._phi(self.hist["features"], self.hist["embeddings"])  # (N, m+e), current statistics
        r = self.hist["rewards"]
        if self.config.get("reward_scale") == "q90" and (r > 0).any():  # rescale to the history's own range
            r = (r / torch.quantile(r[r > 0], 0.9)).clamp(0, 1)
        self._fit(self.f1, self.opt1, phi, r)  # f1 on (φ, r)
        if self.explore:
            with torch.no_grad():
                f1 = self.f1(phi).squeeze(1)
            g, target = self._grad_features(phi), r - f1  # f2 on (∇f1(φ), r − f1(φ))
            if self.optimism > 0 and len(self.passed["features"]) > 0:
                # EE-Net's code: after a pick that earned 0, every arm passed over gets the residual target
                # +0.2. Per round here: as many passed-over samples as the picks fell short of reward 1
                # (Σ(1 − r) over this round's picks, r as f1 learns it), drawn at random, target +optimism.
                shortfall = float((1 - r[-features.shape[0]:]).clamp(0, 1).sum())
                n_opt = min(int(round(shortfall)), len(self.passed["features"]))
                if n_opt > 0:  # (no draw from the RNG otherwise: a round without shortfall is the plain filter's)
                    pick = torch.randperm(len(self.passed["features"]), generator=self.gen)[:n_opt]
                    phi_opt = self._phi(self.passed["features"][pick], self.passed["embeddings"][pick])
                    g = torch.cat([g, self._grad_features(phi_opt)])
                    target = torch.cat([target, torch.full((n_opt,), self.optimism)])
            self._fit(self.f2, self.opt2, g, target)
        self.passed = {k: v[:0] for k, v in self.passed.items()}  # used once

    def _fit(self, net, opt, x, y):
        """`epochs` epochs of shuffled minibatch Adam on the squared loss."""
        for _ in range(self.epochs):
            perm = torch.randperm(x.shape[0], generator=self.gen)
            for i in range(0, x.shape[0], self.batch_size):
                b = perm[i:i + self.batch_size]
                loss = ((net(x[b]).squeeze(1) - y[b]) ** 2).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

    # --- checkpointing

    def state_dict(self):
        """Everything needed to continue identically (a deep copy): nets, optimizers, statistics,
        history and the RNG state."""
        return copy.deepcopy(dict(config=self.config, f1=self.f1.state_dict(), f2=self.f2.state_dict(),
                                  opt1=self.opt1.state_dict(), opt2=self.opt2.state_dict(),
                                  stats=dict(count=self.count, mean=self.mean, m2=self.m2),
                                  hist=self.hist, passed=self.passed, rng=self.gen.get_state()))

    def load_state_dict(self, sd):
        sd = copy.deepcopy(sd)
        sd["config"].setdefault("optimism", 0.0)  # states saved before `optimism` existed
        assert sd["config"] == self.config, f"config mismatch: {sd['config']} vs {self.config}"
        self.f1.load_state_dict(sd["f1"])
        self.f2.load_state_dict(sd["f2"])
        self.opt1.load_state_dict(sd["opt1"])
        self.opt2.load_state_dict(sd["opt2"])
        self.count, self.mean, self.m2 = sd["stats"]["count"], sd["stats"]["mean"], sd["stats"]["m2"]
        self.hist = sd["hist"]
        self.passed = sd.get("passed", {k: v[:0] for k, v in self.passed.items()})
        self.gen.set_state(sd["rng"])
