"""filter.py: the model learnability-aware data filter of LaDa (spec §3).

A neural contextual bandit in the style of EE-Net (Ban et al., ICLR 2022, arXiv 2110.03177), one per
(client, direction), living with the student:
- `sample_features`      the context φ of a sample from the four log-probs and two correctness bits (§3.1)
- `project_embeddings`   the fixed random projection of the student's mean-pooled hidden state (§3.1)
- `learnability_reward`  r = clip(1 − ppl_after / ppl_before, 0, 1) · correct(y_t) (§3.3)
- `LearnabilityFilter`   f1 (exploitation) + f2 (exploration), `select` / `update` / `state_dict` (§3.2)

`python filter.py --demo` runs the filter on synthetic contextual bandits whose expected reward is
known and prints the mean reward of its picks per round next to f1 alone, random picks and the oracle.
"""
import argparse
import copy
import math
import time

import torch
import torch.nn as nn
from torch.func import functional_call, grad, vmap

# -----------------------------------------------------------------------------
# §3.1 the context of a sample (student s, teacher t, sent path y_t, own path y_s)

FEATURE_NAMES = [
    "nll_s_yt",   # NLL of y_t under the student, per character
    "nll_t_yt",   # NLL of y_t under the teacher, per character
    "gap_yt",     # nll_s_yt − nll_t_yt: the learnability gap
    "nll_s_ys",   # NLL of y_s under the student, per character
    "nll_t_ys",   # NLL of y_s under the teacher, per character
    "correct_yt",  # 1 if y_t ends in the gold answer
    "correct_ys",  # 1 if y_s ends in the gold answer
    "log_chars_yt",  # log of the length of y_t in characters
]
FEATURE_DIM = len(FEATURE_NAMES)  # 8; the embedding (embed_dim) is passed separately


def sample_features(logp_s_yt, logp_t_yt, logp_s_ys, logp_t_ys, chars_t, chars_s, correct_t, correct_s):
    """The context features of spec §3.1 (without the embedding), all arguments Tensor[n].

    logp_*: summed natural-log probabilities of a whole path (≤ 0) under student s or teacher t, each
    under its own tokenizer; chars_*: lengths of y_t / y_s in characters; correct_*: 0/1.
    Returns Tensor[n, FEATURE_DIM] (float32) in the order of FEATURE_NAMES. NLLs are per character so
    that scores from different tokenizers compare (§3.1).
    """
    c_t = torch.as_tensor(chars_t, dtype=torch.float32).clamp(min=1)
    c_s = torch.as_tensor(chars_s, dtype=torch.float32).clamp(min=1)
    f = lambda x: torch.as_tensor(x, dtype=torch.float32)
    nll_s_yt, nll_t_yt = -f(logp_s_yt) / c_t, -f(logp_t_yt) / c_t
    nll_s_ys, nll_t_ys = -f(logp_s_ys) / c_s, -f(logp_t_ys) / c_s
    return torch.stack([nll_s_yt, nll_t_yt, nll_s_yt - nll_t_yt, nll_s_ys, nll_t_ys,
                        f(correct_t), f(correct_s), torch.log(c_t)], dim=1)


def project_embeddings(hidden_mean, embed_dim=16, seed=0):
    """Fixed Gaussian projection (§3.1): Tensor[n, h] mean-pooled hidden states -> Tensor[n, embed_dim].

    R ~ N(0, 1/embed_dim)^{h×embed_dim}, drawn from `seed` alone, so every call with the same (h, seed)
    uses the same R (Johnson–Lindenstrauss scaling: norms are roughly preserved).
    """
    h = hidden_mean.shape[1]
    g = torch.Generator().manual_seed(seed)
    R = torch.randn(h, embed_dim, generator=g) / math.sqrt(embed_dim)  # (h, e)
    return hidden_mean.float() @ R.to(hidden_mean.device)


def learnability_reward(nll_before, nll_after, correct):
    """Spec §3.3: r = clip(1 − exp(ℓ_after − ℓ_before), 0, 1) · correct(y_t) = 1 − ppl_after/ppl_before.

    nll_before, nll_after: Tensor[k] per-token NLL of y_t under the student before / after this round's
    distillation; correct: Tensor[k] 0/1 correctness of y_t. Returns Tensor[k] in [0, 1].
    """
    nll_before, nll_after = torch.as_tensor(nll_before).float(), torch.as_tensor(nll_after).float()
    gain = (1 - torch.exp(nll_after - nll_before)).clamp(0, 1)
    return gain * torch.as_tensor(correct).float()

# -----------------------------------------------------------------------------
# §3.2 the filter


def _mlp(d_in, hidden, out_act, gen):
    """d_in -> hidden -> 1 MLP, initialized from `gen` (PyTorch's default uniform bounds) so the
    global RNG is never touched."""
    net = nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, 1), out_act)
    with torch.no_grad():
        for lin in (net[0], net[2]):
            bound = 1 / math.sqrt(lin.in_features)
            lin.weight.uniform_(-bound, bound, generator=gen)
            lin.bias.uniform_(-bound, bound, generator=gen)
    return net


def kmeans_pick(x, k, gen, iters=25):
    """k-means++ then Lloyd on x: Tensor[n, e]; returns LongTensor[k] of distinct rows, the sample
    nearest each centroid (spec §3.2, round 1). Centroids are visited in order; a taken sample is
    skipped, so the picks are distinct."""
    n = x.shape[0]
    x = x.double()
    C = x[torch.randint(n, (1,), generator=gen)]  # k-means++ seeding
    for _ in range(1, k):
        d2 = torch.cdist(x, C).min(1).values ** 2  # (n,)
        p = d2 / d2.sum() if d2.sum() > 0 else torch.full((n,), 1.0 / n, dtype=x.dtype)
        C = torch.cat([C, x[torch.multinomial(p, 1, generator=gen)]])
    for _ in range(iters):  # Lloyd
        assign = torch.cdist(x, C).argmin(1)  # (n,)
        counts = torch.bincount(assign, minlength=k).unsqueeze(1).to(x.dtype)
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
    """EE-Net-style filter of spec §3.2.

    φ = standardize([features, embedding]) with running per-dimension statistics (§3.1).
    f1(φ; θ1) ∈ [0,1] predicts the reward; f2(g(φ); θ2) ∈ [−1,1] predicts the residual r − f1(φ),
    where g(φ) is ∇θ1 f1(φ) block-mean-pooled to ≤ grad_dim entries and scaled to unit RMS.
    u = f1 + f2 (or f1 alone with explore=False, the greedy ablation).

    Usage, once per round: idx = filt.select(features, embeddings); ...train on idx...;
    filt.update(features[idx], embeddings[idx], rewards).
    """

    def __init__(self, feature_dim, embed_dim, budget, min_budget, threshold=0.5, hidden=64, epochs=10,
                 seed=0, lr=1e-2, grad_dim=256, batch_size=32, explore=True):
        assert 1 <= min_budget <= budget, "need 1 <= min_budget <= budget"
        self.config = dict(feature_dim=feature_dim, embed_dim=embed_dim, budget=budget, min_budget=min_budget,
                           threshold=threshold, hidden=hidden, epochs=epochs, seed=seed, lr=lr,
                           grad_dim=grad_dim, batch_size=batch_size, explore=explore)
        self.budget, self.min_budget, self.threshold = budget, min_budget, threshold
        self.epochs, self.batch_size, self.explore = epochs, batch_size, explore
        self.gen = torch.Generator().manual_seed(seed)  # private RNG: init, shuffles, k-means
        d = feature_dim + embed_dim
        self.f1 = _mlp(d, hidden, nn.Sigmoid(), self.gen)  # exploitation net, reward in [0, 1]
        self.n_params = sum(p.numel() for p in self.f1.parameters())
        self.block = math.ceil(self.n_params / grad_dim)  # parameters per pooled gradient entry
        self.grad_dim = math.ceil(self.n_params / self.block)  # ≤ grad_dim
        self.f2 = _mlp(self.grad_dim, hidden, nn.Tanh(), self.gen)  # exploration net, residual in [-1, 1]
        self.opt1 = torch.optim.Adam(self.f1.parameters(), lr=lr)
        self.opt2 = torch.optim.Adam(self.f2.parameters(), lr=lr)
        # running statistics of φ (Chan et al. parallel mean/variance), float64
        self.count = 0
        self.mean = torch.zeros(d, dtype=torch.float64)
        self.m2 = torch.zeros(d, dtype=torch.float64)
        # history: f1's data (raw contexts, rewards) and f2's data (g, residual) as seen when picked
        self.hist = dict(features=torch.zeros(0, feature_dim), embeddings=torch.zeros(0, embed_dim),
                         rewards=torch.zeros(0), grads=torch.zeros(0, self.grad_dim), residuals=torch.zeros(0))

    # --- context

    def _fold_stats(self, x):
        """Merge the rows of x: Tensor[n, d] into the running mean/variance."""
        x = x.double()
        n, mu, m2 = x.shape[0], x.mean(0), ((x - x.mean(0)) ** 2).sum(0)
        tot = self.count + n
        delta = mu - self.mean
        self.mean = self.mean + delta * n / tot
        self.m2 = self.m2 + m2 + delta ** 2 * self.count * n / tot
        self.count = tot

    def _phi(self, features, embeddings):
        """φ = standardized [features, embedding]: Tensor[n, m+e]. Std floored at 1e-3 and z clipped to
        ±5, so a feature that was constant so far cannot blow up."""
        x = torch.cat([features.float(), embeddings.float()], 1)
        if self.count == 0:
            return x
        std = (self.m2 / max(self.count - 1, 1)).sqrt().clamp(min=1e-3)
        return ((x.double() - self.mean) / std).clamp(-5, 5).float()

    def _grad_features(self, phi):
        """g(φ): ∇θ1 f1(φ) per sample (torch.func vmap of grad), block-mean-pooled and scaled to unit RMS.
        Tensor[n, m+e] -> Tensor[n, grad_dim]."""
        params = {k: v.detach() for k, v in self.f1.named_parameters()}
        f = lambda p, x: functional_call(self.f1, p, (x.unsqueeze(0),)).squeeze()
        g = vmap(grad(f), in_dims=(None, 0))(params, phi)  # dict of (n, *shape)
        g = torch.cat([g[k].reshape(phi.shape[0], -1) for k in params], 1)  # (n, P)
        pad = self.grad_dim * self.block - self.n_params  # zero-pad the last block, then a true mean
        pool = lambda t: nn.functional.pad(t, (0, pad)).view(-1, self.grad_dim, self.block).sum(2)
        g = pool(g) / pool(torch.ones(1, self.n_params))  # (n, grad_dim) block means
        return g * getattr(self, 'gscale', 1.0) / (g.norm(dim=1, keepdim=True) + 1e-12)  # "normalized gradient"

    @torch.no_grad()
    def _score(self, phi):
        """(f1, f2, g): Tensor[n] each, and the gradient features Tensor[n, grad_dim]."""
        f1 = self.f1(phi).squeeze(1)
        with torch.enable_grad():
            g = self._grad_features(phi)
        f2 = self.f2(g).squeeze(1) if self.explore else torch.zeros_like(f1)
        return f1, f2, g

    def scores(self, features, embeddings):
        """(f1, f2): Tensor[n] each, for inspection and logging; changes no state. u = f1 + f2."""
        f1, f2, _ = self._score(self._phi(features, embeddings))
        return f1, f2

    # --- selection (§3.2)

    def select(self, features, embeddings):
        """Pick samples from a pool: features Tensor[n, m], embeddings Tensor[n, e] -> LongTensor of
        distinct indices. No reward history yet: k-means (k = min(budget, n)) on the embeddings, the
        sample nearest each centroid. Afterwards: every x with u(x) ≥ threshold, cut to `budget` and
        padded to `min_budget`, both by top u; returned in descending u.
        Scores with the statistics the nets were trained with, then folds the pool into the running
        statistics (pools are unbiased draws of the contexts; the picks are not)."""
        n = features.shape[0]
        if len(self.hist["rewards"]) == 0:
            idx = kmeans_pick(embeddings.float(), min(self.budget, n), self.gen)  # round 1
        else:
            f1, f2, _ = self._score(self._phi(features, embeddings))
            u = f1 + f2
            order = torch.sort(u, descending=True, stable=True).indices
            k = int((u >= self.threshold).sum())
            k = min(max(min(k, self.budget), self.min_budget), n)  # cut to budget, pad to min_budget
            idx = order[:k]
        self._fold_stats(torch.cat([features.float(), embeddings.float()], 1))
        return idx

    # --- learning (§3.2 last bullet)

    def update(self, features, embeddings, rewards):
        """Add the picked samples' (context, reward) pairs and retrain both nets on all history.
        features Tensor[k, m], embeddings Tensor[k, e], rewards Tensor[k] in [0, 1].
        As in EE-Net, f2's target is the residual r − f1(φ) of the f1 that made the pick (its
        out-of-sample error), with g(φ) taken at that f1; both are stored, f1 then trains on (φ, r)."""
        rewards = torch.as_tensor(rewards, dtype=torch.float32).reshape(-1)
        if self.count == 0:  # update before any select: the stats start from these contexts
            self._fold_stats(torch.cat([features.float(), embeddings.float()], 1))
        f1, _, g = self._score(self._phi(features, embeddings))
        new = dict(features=features.float(), embeddings=embeddings.float(), rewards=rewards,
                   grads=g, residuals=rewards - f1)
        self.hist = {k: torch.cat([self.hist[k], new[k]]) for k in self.hist}
        phi = self._phi(self.hist["features"], self.hist["embeddings"])  # all history, current stats
        self._fit(self.f1, self.opt1, phi, self.hist["rewards"])  # f1 on (φ, r)
        if self.explore:
            if getattr(self, 'mode', 'a') == 'b':
                f1n, _, gn = self._score(phi)
                self._fit(self.f2, self.opt2, gn, self.hist["rewards"] - f1n)
            else:
                self._fit(self.f2, self.opt2, self.hist["grads"], self.hist["residuals"])  # f2 on (g, r − f1)

    def _fit(self, net, opt, x, y):
        """`epochs` epochs of shuffled minibatch Adam on the squared loss."""
        n = x.shape[0]
        for _ in range(self.epochs):
            perm = torch.randperm(n, generator=self.gen)
            for i in range(0, n, self.batch_size):
                b = perm[i:i + self.batch_size]
                loss = ((net(x[b]).squeeze(1) - y[b]) ** 2).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

    # --- checkpointing

    def state_dict(self):
        """Everything needed to continue identically (a deep copy)."""
        return copy.deepcopy(dict(config=self.config, f1=self.f1.state_dict(), f2=self.f2.state_dict(),
                                  opt1=self.opt1.state_dict(), opt2=self.opt2.state_dict(),
                                  stats=dict(count=self.count, mean=self.mean, m2=self.m2),
                                  hist=self.hist, rng=self.gen.get_state()))

    def load_state_dict(self, sd):
        assert sd["config"] == self.config, f"config mismatch: {sd['config']} vs {self.config}"
        sd = copy.deepcopy(sd)
        self.f1.load_state_dict(sd["f1"])
        self.f2.load_state_dict(sd["f2"])
        self.opt1.load_state_dict(sd["opt1"])
        self.opt2.load_state_dict(sd["opt2"])
        self.count, self.mean, self.m2 = sd["stats"]["count"], sd["stats"]["mean"], sd["stats"]["m2"]
        self.hist = sd["hist"]
        self.gen.set_state(sd["rng"])
