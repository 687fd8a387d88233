"""protocol.py: the round of spec §2 as its messages and its steps, each side apart.

A method is a choice of allocation and of loss (METHODS, spec §2's table). Everything that crosses
between the server (the LLM) and a client (an SLM) is a message dict of SCHEMA: `send` checks and
counts it, `receive` is the receiver's check before any use. Each step of the round is one function
of its side, `server_*` or `client_*` (plus `local_step`, which every party runs), taking the
messages it receives and returning the message it sends; what a party keeps to itself stays in its
`state`. `federated.run` calls these in order in one process; `flower_app.py` calls the same
functions on each side of a network.
"""
import torch

# method -> (allocation, loss) of the host loop; spec §2's table (v1) and §4''s (v2)
METHODS = {"local": (None, None), "fedmkt": ("fedmkt", "sft"),
           # LaDa v2 (spec §4'): the host fedmkt, unchanged, plus a plug-in (PLUGIN) on a subset of its allocation
           "lada": ("fedmkt", "sft"), "lada-random": ("fedmkt", "sft"), "lada-sft": ("fedmkt", "sft"),
           "lada-nofilter": ("fedmkt", "sft"),
           # LaDa v1 (spec §2-§4), kept so that the recorded grid reproduces (its result files say lada,
           # lada-filter, lada-loss: see compare.V1)
           "lada-v1": ("filter", "dard"), "lada-v1-filter": ("filter", "sft"), "lada-v1-loss": ("all", "dard"),
           "random": ("random", "dard"),
           "fedavg": (None, None),  # homo only: FedAvg of the SLMs and nothing else (`local` has no FedAvg)
           "oracle": ("oracle", "sft")}  # the testbed's headroom check: every correct teacher path of the pool
# v2 method -> (the plug-in's pick A_k from the host's H_k, the plug-in's loss); spec §4''s table
PLUGIN = {"lada": ("filter", "dard2"), "lada-random": ("random", "dard2"), "lada-sft": ("filter", "sft"),
          "lada-nofilter": ("all", "dard2")}


def uses_filter(method: str) -> bool:
    """Does the method have LaDa filters (one per client and direction)?"""
    return METHODS[method][0] == "filter" or PLUGIN.get(method, (None,))[0] == "filter"


# -----------------------------------------------------------------------------
# Messages: everything that crosses between server and clients is one of these dicts (spec §2)

SCHEMA = {  # message kind -> allowed fields; only public questions, path texts and per-sample scalars
    "pool": {"questions", "y_llm", "logp_llm_yllm", "nll_gold_llm"},
    "client_paths": {"y_slm", "logp_slm_yslm", "logp_slm_yllm", "nll_gold_slm"},
    "llm_score": {"logp_llm_yslm"},
    "weights": {"state_dict"},  # homo only: FedAvg of SLM weights (FedMKT's homogeneous setting)
}


def send(msg: dict, kind: str, traffic: dict, direction: str) -> dict:
    """Check a message against SCHEMA and count its bytes (UTF-8 text, 4 bytes per scalar)."""
    extra = set(msg) - SCHEMA[kind]
    if extra:
        raise RuntimeError(f"message '{kind}' carries fields outside the protocol: {sorted(extra)}")
    traffic[direction] = traffic.get(direction, 0) + message_bytes(msg)
    return msg


def message_bytes(msg: dict) -> int:
    n = 0
    for v in msg.values():
        if isinstance(v, dict):
            n += sum(t.numel() * t.element_size() for t in v.values())
        elif isinstance(v, torch.Tensor):
            n += 4 * v.numel()
        else:
            n += sum(len(s.encode("utf-8", "surrogatepass")) if isinstance(s, str) else 4 for s in v)
    return n


# What a receiver accepts (`receive`): the fields of each kind (the gold NLLs only with fedmkt), what
# each field holds, and the caps. A path has at most max_new_tokens tokens, so at most
# MAX_CHARS_PER_TOKEN * max_new_tokens characters; a question at most MAX_CHARS_PER_TOKEN * max_len.
FIELD_TYPE = {"questions": "question", "y_llm": "path", "y_slm": "path", "logp_llm_yllm": "logp",
              "logp_slm_yslm": "logp", "logp_slm_yllm": "logp", "logp_llm_yslm": "logp", "nll_gold_llm": "nll",
              "nll_gold_slm": "nll"}
GOLD_FIELDS = {"nll_gold_llm", "nll_gold_slm"}
MAX_CHARS_PER_TOKEN = 32
MAX_MESSAGE_BYTES = 64 * 2**20  # a transport refuses a larger message before reading it


class BadMessage(ValueError):
    """A message its receiver refuses; the text says which field and why."""


def receive(msg, kind: str, n_questions: int, cfg, known_questions=None) -> dict:
    """The receiver's check of a message before any use of it; returns it (score lists as float
    tensors) or raises BadMessage. Exactly the fields of `kind` for this method; each field one entry
    per pooled question (n_questions, which the receiver knows itself); texts are str, at most
    MAX_CHARS_PER_TOKEN * max_new_tokens characters a path and * max_len a question, questions among
    known_questions (D_pub) when given; log-probs finite and <= 0, gold NLLs finite and >= 0; at most
    MAX_MESSAGE_BYTES in all. The in-process loop calls it on every message; a transport calls it on
    what arrives."""
    if not isinstance(msg, dict):
        raise BadMessage(f"'{kind}' is a {type(msg).__name__}, not a dict")
    want = SCHEMA[kind] - (set() if METHODS[cfg["method"]][0] == "fedmkt" else GOLD_FIELDS)
    missing, extra = want - set(msg), set(msg) - want
    if missing or extra:
        raise BadMessage(f"'{kind}' has " + "; ".join(
            ([f"missing fields {sorted(missing)}"] if missing else []) +
            ([f"fields outside the protocol {sorted(map(str, extra))}"] if extra else [])))
    out = {}
    for f in sorted(want):
        v, typ = msg[f], FIELD_TYPE[f]
        if typ in ("question", "path"):
            if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
                raise BadMessage(f"'{kind}'.{f} must be a list of strings")
        else:
            if isinstance(v, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
                v = torch.tensor(v, dtype=torch.float32)
            if not isinstance(v, torch.Tensor) or not v.is_floating_point() or v.dim() != 1:
                raise BadMessage(f"'{kind}'.{f} must be a 1-D float tensor (or list of numbers)")
        if len(v) != n_questions:
            raise BadMessage(f"'{kind}'.{f} has {len(v)} entries for {n_questions} pooled questions")
        out[f] = v
    size = message_bytes(out)
    if size > MAX_MESSAGE_BYTES:
        raise BadMessage(f"'{kind}' is {size / 2**20:.1f} MiB, above the cap of {MAX_MESSAGE_BYTES // 2**20} MiB")
    for f, v in out.items():
        typ = FIELD_TYPE[f]
        if typ in ("question", "path"):
            cap = MAX_CHARS_PER_TOKEN * cfg["max_new_tokens" if typ == "path" else "max_len"]
            i = next((i for i, s in enumerate(v) if len(s) > cap), None)
            if i is not None:
                raise BadMessage(f"'{kind}'.{f}[{i}] has {len(v[i])} characters, above the cap of {cap}")
            try:
                for s in v:
                    s.encode("utf-8")
            except UnicodeEncodeError:
                raise BadMessage(f"'{kind}'.{f} holds text that is not valid Unicode") from None
            if typ == "question" and known_questions is not None:
                i = next((i for i, q in enumerate(v) if q not in known_questions), None)
                if i is not None:
                    raise BadMessage(f"'{kind}'.{f}[{i}] is not a public question")
        else:
            bad = ~torch.isfinite(v)
            if bad.any():
                i = int(bad.nonzero()[0])
                raise BadMessage(f"'{kind}'.{f}[{i}] is {v[i].item()}, not a finite number")
            wrong = v > 1e-3 if typ == "logp" else v < -1e-3  # a log-prob is <= 0, an NLL >= 0
            if wrong.any():
                i = int(wrong.nonzero()[0])
                raise BadMessage(f"'{kind}'.{f}[{i}] is {v[i].item():.4g}, but a {'log-prob is <= 0' if typ == 'logp' else 'NLL is >= 0'}")
    return out




# -----------------------------------------------------------------------------
# What one party does with a set of questions: its paths, their scores, their correctness

def score(cfg, party, questions, paths):
    """(summed log-probs, token counts) of each path under the party's model (distill.score_paths)."""
    from distill import score_paths

    return score_paths(party.model, party.tok, questions, paths, cfg["score_batch"], cfg["device"])


def paths_and_scores(cfg, party, questions, seed):
    """A sampled path for each question (temperature gen_temperature) and its summed log-prob."""
    from data import format_prompt
    from eval import generate

    ys = generate(party.model, party.tok, [format_prompt(q) for q in questions], max_new_tokens=cfg["max_new_tokens"],
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
    import eval as ev

    return torch.tensor([float(ev.is_correct(y, party.gold[q], party.grading)) for q, y in zip(questions, paths)])


def embeddings(cfg, party, questions):
    """The student's embedding of each question (spec §3.1): projected mean final hidden state."""
    from data import format_prompt
    from filter import project_embeddings
    from models import mean_hidden

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
    from filter import learnability_reward

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
    from distill import local_sft

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
    if uses_filter(cfg["method"]) and cfg["scenario"] != "llm2slm":  # F_k^up's context
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
    from distill import distill, teacher_targets
    from filter import sample_features

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
        from distill import distill_plugin

        pick, plug_loss = PLUGIN[cfg["method"]]
        H = allocate(alloc, None, feats, None, offer.get("nll_gold_llm"), st.get("nll_gold"), c_llm, cfg, rng)  # 5
        A = plugin_pick(pick, filt, feats, emb, H, cfg, rng, count)  # 5 (plug-in)
        pairs = [dict(question=qs[i], y_pos=y_llm[i], y_neg=st["y"][i], correct_pos=bool(c_llm[i]),
                      correct_neg=bool(c_k[i])) for i in A]
        got = distill_plugin(client.model, client.tok, client.opt, [dict(question=qs[i], y_pos=y_llm[i]) for i in H],
                             pairs, client.local, plug_loss, cfg, rng, cfg["device"])  # 6
        trained = [A[j] for j in got["plugin"]["trained"]]  # rewards only for pairs DARD v2 trained on
        reward = (reward_and_update(cfg, client, qs, y_llm, trained, st["lp_yllm"], st["n_yllm"], c_llm, filt, feats, emb)
                  if trained else None)  # 7
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
    from filter import sample_features

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
    from distill import distill, teacher_targets

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
    rewarded for the pairs of its A_k that were trained on. Returns {"losses", "rewards", "plugin"}."""
    from distill import dard_v2_pair, distill_plugin

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
    trained = [owner[j] for j in diag["trained"]]
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
