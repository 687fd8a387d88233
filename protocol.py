"""protocol.py: the steps of spec §2's round, each side apart.

Each step is one function of its side, `server_*` or `client_*` (plus `local_step`, which every party
runs), taking the messages it receives (messages.SCHEMA dicts) and returning the message it sends;
what a party keeps to itself stays in its `state`. `client_exchange` is a client's whole side of one
message exchange (stage): `federated.play_round` drives the round through it, by function calls in
one process or over Flower (flower_app.py) on each client's machine.
"""
import torch

import eval as ev
from data import format_prompt
from distill import dard_v2_pair, distill, distill_plugin, local_sft, score_paths, teacher_targets
from filter import learnability_reward, project_embeddings, sample_features
from lora import is_lora
from messages import receive
from methods import METHODS, PLUGIN, SCENARIOS, uses_filter
from models import mean_hidden

# -----------------------------------------------------------------------------
# What one party does with a set of questions: its paths, their scores, their correctness

def score(cfg, party, questions, paths):
    """(summed log-probs, token counts) of each path under the party's model (distill.score_paths)."""
    return score_paths(party.model, party.tok, questions, paths, cfg["score_batch"], cfg["device"])


def paths_and_scores(cfg, party, questions, seed):
    """A sampled path for each question (temperature gen_temperature) and its summed log-prob."""
    ys = ev.generate(party.model, party.tok, [format_prompt(q) for q in questions], max_new_tokens=cfg["max_new_tokens"],
                  temperature=cfg["gen_temperature"], batch_size=cfg["eval_batch"], seed=seed, device=cfg["device"],
                  stop_at_answer_line=cfg["stop_at_answer_line"])
    lp, n = score(cfg, party, questions, ys)
    return ys, lp, n


def gold_nll(cfg, party, questions):
    """Per-character NLL of each gold solution (FedMKT's selective rule, compared across tokenizers)."""
    gold = [party.gold[q] for q in questions]
    lp, _ = score(cfg, party, questions, gold)
    return -lp / torch.tensor([max(1, len(g)) for g in gold], dtype=torch.float32)


def correctness(party, questions, paths):
    """0/1 per path: does it end in the gold answer of its (public) question? (graded as --grading says)"""
    return torch.tensor([float(ev.is_correct(y, party.gold[q], party.grading)) for q, y in zip(questions, paths)])


def embeddings(cfg, party, questions):
    """The student's embedding of each question (spec §3.1): projected mean final hidden state."""
    h = mean_hidden(party.model, party.tok, [format_prompt(q) for q in questions], cfg["score_batch"], cfg["device"])
    return project_embeddings(h, cfg["embed_dim"], cfg["seed"])


def chars(paths):
    return torch.tensor([len(y) for y in paths], dtype=torch.float32)


def allocate(kind, filt, feats, emb, nll_teacher_gold, nll_student_gold, correct_teacher, cfg, rng, count=None):
    """Spec §2 step 5: the indices of the pool this student learns from. `random` takes `count`
    samples where given (the count another run's filter picked for this student and round, so the two
    differ in which samples only: --counts_from), else `budget`; `oracle` takes every sample whose
    teacher path is correct (the testbed's headroom check, not a method)."""
    n = feats.shape[0]
    if kind == "all":
        return list(range(n))
    if kind == "oracle":
        return [i for i in range(n) if correct_teacher[i] > 0]
    if kind == "random":
        return sorted(rng.sample(range(n), min(cfg["budget"] if count is None else count, n)))
    if kind == "fedmkt":  # learn where the teacher fits the gold solution better than the student
        return [i for i in range(n) if nll_teacher_gold[i] < nll_student_gold[i]]
    return sorted(filt.select(feats, emb).tolist())  # the LaDa filter (spec §3.2)


def plugin_pick(kind, filt, feats, emb, host, cfg, rng, count=None) -> list[int]:
    """Spec §4': the plug-in's A_k, a subset of the host's allocation H_k (`host`, indices into the pool):
    the filter's picks among H_k at budget min(plugin_budget, |H_k|) (the filter was made with that
    budget), a random subset of `count` samples where given (`lada`'s count for this student and round:
    --counts_from) else min(plugin_budget, |H_k|), or all of H_k."""
    if not host:
        return []
    if kind == "all":
        return list(host)
    if kind == "random":
        return sorted(rng.sample(host, min(cfg["plugin_budget"] if count is None else count, len(host))))
    sub = filt.select(feats[host], emb[host]).tolist()  # the LaDa filter (spec §3.2) on H_k only
    return sorted(host[j] for j in sub)


def plugin_diagnostics(host, picked, got) -> dict:
    """What log.jsonl keeps of a plug-in step (spec §4'): |H_k|, |A_k|, the pairs of each kind, and the
    mean change of log p per token of y+ and y- against pi_ref."""
    d = {k: got[k] for k in ("contrast", "imitation", "dropped", "dlogp_pos", "dlogp_neg") if k in got}
    return dict(H=len(host), A=len(picked), **d)


def trained_on(picked, y_pos, y_neg, loss):
    """The picked samples the student actually trains on: DARD drops a pair whose two paths are the
    same text (spec §4), so it gets no reward and does not update the filter."""
    return [i for i in picked if loss != "dard" or y_pos[i] != y_neg[i]]


def reward_and_update(cfg, student, qs, paths, idx, lp_before, n_before, correct, filt, feats, emb):
    """Spec §2 step 7 / §3.3: the student re-scores the sent paths it trained on; the rewards update
    its filter (when it has one). Returns the mean reward."""
    lp_after, n_after = score(cfg, student, [qs[i] for i in idx], [paths[i] for i in idx])
    r = learnability_reward(-lp_before[idx] / n_before[idx], -lp_after / n_after, correct[idx])
    if filt is not None:
        filt.update(feats[idx], emb[idx], r)
    return float(r.mean())


# -----------------------------------------------------------------------------
# The round of spec §2, one function per step. Each takes the messages it receives and returns the
# message it sends (a dict of SCHEMA); what a party keeps to itself stays in its `state`. Server-side
# functions take the server (the LLM's Party), client-side ones a client; nothing else is shared, so
# a transport other than function calls can carry the messages.

def local_step(party, cfg, rng) -> float:
    """1. The party trains on its own local data (SFT, local_steps). Returns the mean loss."""
    return local_sft(party.model, party.tok, party.opt, party.local, cfg["local_steps"], cfg["local_batch"], rng,
                     cfg["device"], lr_scale=cfg.get("local_lr_scale", 1.0))


def server_offer(server, cfg, rnd, rng) -> dict:
    """2. Server -> clients: a pool of public questions, the LLM's sampled path for each and its
    score of it ("pool"; with fedmkt also the LLM's per-character NLL of each gold solution)."""
    qs = [p["question"] for p in rng.sample(server.public, min(cfg["pool_size"], len(server.public)))]
    y, lp, n = paths_and_scores(cfg, server, qs, cfg["seed"] * 10**6 + rnd)
    server.state = dict(round=rnd, qs=qs, y=y, lp_y=lp, n_y=n, c_y=correctness(server, qs, y), clients={})
    offer = {"questions": qs, "y_llm": y, "logp_llm_yllm": lp}
    if METHODS[cfg["method"]][0] == "fedmkt":
        server.state["nll_gold"] = offer["nll_gold_llm"] = gold_nll(cfg, server, qs)
    if uses_filter(cfg["method"]) and SCENARIOS[cfg["scenario"]]["llm_learns"]:  # F_k^up's context
        server.state["emb"] = embeddings(cfg, server, qs)
    return offer


def client_answer(client, offer, cfg, rnd, k) -> dict:
    """3. Client k -> server: its own sampled path for each pooled question and its scores of both
    paths ("client_paths"; with fedmkt also its per-character NLL of each gold solution)."""
    qs = offer["questions"]
    y, lp_y, n_y = paths_and_scores(cfg, client, qs, cfg["seed"] * 10**6 + 1000 * (k + 1) + rnd)
    lp_yllm, n_yllm = score(cfg, client, qs, offer["y_llm"])
    client.state = dict(round=rnd, y=y, lp_y=lp_y, n_y=n_y, lp_yllm=lp_yllm, n_yllm=n_yllm)
    reply = {"y_slm": y, "logp_slm_yslm": lp_y, "logp_slm_yllm": lp_yllm}
    if METHODS[cfg["method"]][0] == "fedmkt":
        client.state["nll_gold"] = reply["nll_gold_slm"] = gold_nll(cfg, client, qs)
    return reply


def server_score(server, name, reply, cfg) -> dict:
    """4. Server -> client k: the LLM's score of the client's paths ("llm_score")."""
    st = server.state
    lp, n = score(cfg, server, st["qs"], reply["y_slm"])
    st["clients"][name] = dict(reply=reply, lp_yk=lp, n_yk=n, c_yk=correctness(server, st["qs"], reply["y_slm"]))
    return {"logp_llm_yslm": lp}


def client_learn(client, offer, llm_score, cfg, rng) -> dict:
    """5, 6, 7 on client k: F_k^down picks A_k (student S_k, teacher L), S_k distills on it
    (y+ = y_L, y- = y_k), re-scores y_L and updates F_k^down with the rewards.
    Returns {"selected", "reward" (None if nothing was picked), "losses"}."""
    alloc, loss = METHODS[cfg["method"]]
    st, qs, y_llm = client.state, offer["questions"], offer["y_llm"]
    c_llm, c_k = correctness(client, qs, y_llm), correctness(client, qs, st["y"])
    len_llm, len_k = chars(y_llm), chars(st["y"])
    feats = sample_features(st["lp_yllm"], offer["logp_llm_yllm"], st["lp_y"], llm_score["logp_llm_yslm"],
                            len_llm, len_k, c_llm, c_k)
    filt = client.filters.get("down")
    emb = embeddings(cfg, client, qs) if filt is not None else None
    count = client.counts.get((st.get("round"), "down"))
    if cfg["method"] in PLUGIN:  # v2: the host's H_k, the plug-in's A_k within it, one distillation (spec §4')
        pick, plug_loss = PLUGIN[cfg["method"]]
        H = allocate(alloc, None, feats, None, offer.get("nll_gold_llm"), st.get("nll_gold"), c_llm, cfg, rng)  # 5
        A = plugin_pick(pick, filt, feats, emb, H, cfg, rng, count)  # 5 (plug-in)
        pairs = [dict(question=qs[i], y_pos=y_llm[i], y_neg=st["y"][i], correct_pos=bool(c_llm[i]),
                      correct_neg=bool(c_k[i])) for i in A]
        got = distill_plugin(client.model, client.tok, client.opt, [dict(question=qs[i], y_pos=y_llm[i]) for i in H],
                             pairs, client.local, plug_loss, cfg, rng, cfg["device"])  # 6
        fed_back = [A[j] for j in got["plugin"]["rewarded"]]  # trained on, or dropped (reward 0: its y+ is wrong)
        reward = (reward_and_update(cfg, client, qs, y_llm, fed_back, st["lp_yllm"], st["n_yllm"], c_llm, filt, feats, emb)
                  if fed_back else None)  # 7
        return dict(selected=len(A), reward=reward, plugin=plugin_diagnostics(H, A, got["plugin"]),
                    losses={k: v for k, v in got.items() if k not in ("steps", "n", "plugin")})
    A = allocate(alloc, filt, feats, emb, offer.get("nll_gold_llm"), st.get("nll_gold"), c_llm, cfg, rng, count)  # 5
    q = teacher_targets(offer["logp_llm_yllm"], llm_score["logp_llm_yslm"], len_llm, len_k, c_llm, c_k, cfg["tau"])
    samples = [dict(question=qs[i], y_pos=y_llm[i], y_neg=st["y"][i], q=float(q[i]), correct_pos=bool(c_llm[i]))
               for i in A]
    stats = distill(client.model, client.tok, client.opt, samples, client.local, loss, cfg, rng, cfg["device"])  # 6
    trained = trained_on(A, y_llm, st["y"], loss)  # DARD drops identical pairs: they earn no reward
    reward = (reward_and_update(cfg, client, qs, y_llm, trained, st["lp_yllm"], st["n_yllm"], c_llm, filt, feats, emb)
              if trained else None)  # 7
    return dict(selected=len(A), reward=reward, losses={k: v for k, v in stats.items() if k not in ("steps", "n")})


def server_pick(server, name, cfg, rng) -> list[int]:
    """5' on the server: F_k^up picks B_k (student L, teacher S_k) from client k's reply."""
    alloc = METHODS[cfg["method"]][0]
    st, ck = server.state, server.state["clients"][name]
    reply = ck["reply"]
    ck["feats"] = sample_features(ck["lp_yk"], reply["logp_slm_yslm"], st["lp_y"], reply["logp_slm_yllm"],
                                  chars(reply["y_slm"]), chars(st["y"]), ck["c_yk"], st["c_y"])
    filt, count = server.filters.get(f"up/{name}"), server.counts.get((st.get("round"), f"up/{name}"))
    if cfg["method"] in PLUGIN:  # v2: the host's H_k, then the plug-in's A_k within it (spec §4')
        ck["H"] = allocate(alloc, None, ck["feats"], None, reply.get("nll_gold_slm"), st.get("nll_gold"), ck["c_yk"],
                           cfg, rng)
        ck["B"] = plugin_pick(PLUGIN[cfg["method"]][0], filt, ck["feats"], st.get("emb"), ck["H"], cfg, rng, count)
        return ck["B"]
    ck["B"] = allocate(alloc, filt, ck["feats"], st.get("emb"), reply.get("nll_gold_slm"),
                       st.get("nll_gold"), ck["c_yk"], cfg, rng, count)
    return ck["B"]


def server_learn(server, cfg, rng) -> dict:
    """6', 7' on the server: L distills on the union of the B_k (teacher S_k: y+ = y_k, y- = y_L),
    then re-scores each y_k it trained on and updates F_k^up. Returns {"losses", "rewards"}."""
    loss = METHODS[cfg["method"]][1]
    st = server.state
    qs, len_llm, samples = st["qs"], chars(st["y"]), []
    if cfg["method"] in PLUGIN:
        return _server_learn_plugin(server, cfg, rng)
    for name, ck in st["clients"].items():
        if "B" not in ck:
            continue
        reply = ck["reply"]
        q_up = teacher_targets(reply["logp_slm_yslm"], reply["logp_slm_yllm"], chars(reply["y_slm"]), len_llm,
                               ck["c_yk"], st["c_y"], cfg["tau"])
        samples += [dict(question=qs[i], y_pos=reply["y_slm"][i], y_neg=st["y"][i], q=float(q_up[i]),
                         correct_pos=bool(ck["c_yk"][i])) for i in ck["B"]]
    stats = distill(server.model, server.tok, server.opt, samples, server.local, loss, cfg, rng, cfg["device"])  # 6'
    rewards = {}
    for name, ck in st["clients"].items():  # 7': what L learned of each y_k (novel to the LLM)
        trained = trained_on(ck.get("B", []), ck["reply"]["y_slm"], st["y"], loss)
        if trained:
            rewards[name] = reward_and_update(cfg, server, qs, ck["reply"]["y_slm"], trained, ck["lp_yk"], ck["n_yk"],
                                              ck["c_yk"], server.filters.get(f"up/{name}"), ck["feats"], st.get("emb"))
    return dict(losses={k: v for k, v in stats.items() if k not in ("steps", "n")}, rewards=rewards)



def _server_learn_plugin(server, cfg, rng) -> dict:
    """6', 7' of v2 (spec §4'): L trains on the union of the host's H_k (SFT on y_k) plus gamma * the
    plug-in's loss on the union of the A_k (y+ = y_k, y- = y_L), in one distillation; then each F_k^up is
    rewarded for the pairs of its A_k that were trained on, and 0 for its dropped picks (a wrong y_k).
    Returns {"losses", "rewards", "plugin"}."""
    st, qs = server.state, server.state["qs"]
    host, pairs, owner = [], [], []  # owner[j]: (client, pool index) of pairs[j]
    for name, ck in st["clients"].items():
        if "B" not in ck:
            continue
        y_k = ck["reply"]["y_slm"]
        host += [dict(question=qs[i], y_pos=y_k[i]) for i in ck["H"]]
        pairs += [dict(question=qs[i], y_pos=y_k[i], y_neg=st["y"][i], correct_pos=bool(ck["c_yk"][i]),
                       correct_neg=bool(st["c_y"][i])) for i in ck["B"]]
        owner += [(name, i) for i in ck["B"]]
    got = distill_plugin(server.model, server.tok, server.opt, host, pairs, server.local, PLUGIN[cfg["method"]][1],
                         cfg, rng, cfg["device"])  # 6'
    diag = got["plugin"]
    trained = [owner[j] for j in diag["rewarded"]]  # trained on, or dropped (reward 0: its y+ is wrong)
    rewards, plugin = {}, {}
    for name, ck in st["clients"].items():  # 7': what L learned of each y_k, for the pairs it trained on
        if "B" not in ck:
            continue
        mine = [j for j, (n, _) in enumerate(owner) if n == name]
        kinds = {k: 0 for k in ("contrast", "imitation", "dropped")}
        for j in mine:
            kinds[dard_v2_pair(pairs[j]["correct_pos"], pairs[j]["correct_neg"])] += 1
        plugin[f"up/{name}"] = dict(H=len(ck["H"]), A=len(ck["B"]), **kinds)
        idx = [i for n, i in trained if n == name]
        if idx:
            rewards[name] = reward_and_update(cfg, server, qs, ck["reply"]["y_slm"], idx, ck["lp_yk"], ck["n_yk"],
                                              ck["c_yk"], server.filters.get(f"up/{name}"), ck["feats"], st.get("emb"))
    plugin["llm"] = {k: diag[k] for k in ("dlogp_pos", "dlogp_neg")}  # the student of the up direction
    return dict(losses={k: v for k, v in got.items() if k not in ("steps", "n", "plugin")}, rewards=rewards,
                plugin=plugin)


# -----------------------------------------------------------------------------
# FedAvg of the SLMs (homo: FedMKT's homogeneous setting), after their local step

def shared_weights(model) -> dict:
    """What an SLM sends for FedAvg: its trainable weights (a LoRA party's adapters; its frozen base
    stays as loaded) or its whole state dict."""
    if is_lora(model):
        return {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}
    return model.state_dict()


def average(state_dicts):
    """The server's step: the entrywise mean of the SLMs' shared weights (float32)."""
    with torch.no_grad():
        return {k: torch.stack([sd[k].float() for sd in state_dicts]).mean(0) for k in state_dicts[0]}


def load_shared(model, avg: dict):
    """Take the average into the model, each tensor in the model's own dtype."""
    sd = model.state_dict()
    with torch.no_grad():
        model.load_state_dict({k: v.to(sd[k].dtype) for k, v in avg.items()}, strict=not is_lora(model))


# -----------------------------------------------------------------------------
# A client's side of each exchange of the round. stage -> (its report, the messages it sends back);
# the report holds its own figures only (unprefixed: the server files them under the client's name).

def client_exchange(stage: str, client, msgs: dict, cfg, rnd: int, rng) -> tuple[dict, dict]:
    """"local" (FedAvg rounds): 1, then its weights go up. "answer": FedAvg's average in (or else 1),
    then, with a pool, 3 (the client's paths and scores). "learn": 5, 6, 7 on the LLM's scores."""
    if stage == "local":
        return {"losses": {"local": local_step(client, cfg, rng)}}, {"weights": {"state_dict": shared_weights(client.model)}}
    if stage == "answer":
        report = {"losses": {}}
        if "weights" in msgs:  # the local step ran in "local"
            load_shared(client.model, msgs["weights"]["state_dict"])
        else:
            report["losses"]["local"] = local_step(client, cfg, rng)  # 1
        if "pool" not in msgs:  # local, fedavg: no distillation
            return report, {}
        pool = receive(msgs["pool"], "pool", min(cfg["pool_size"], len(client.public)), cfg, client.gold)  # checked first
        reply = client_answer(client, pool, cfg, rnd, int(client.name[3:]) - 1)  # 3
        client.state["pool"] = pool
        return report, {"client_paths": reply}
    if stage == "learn":
        pool = client.state["pool"]
        score = receive(msgs["llm_score"], "llm_score", len(pool["questions"]), cfg)  # checked first
        got = client_learn(client, pool, score, cfg, rng)  # 5, 6, 7
        return {k: got[k] for k in ("losses", "selected", "reward", "plugin") if k in got}, {}
    raise ValueError(f"unknown stage {stage!r}")
