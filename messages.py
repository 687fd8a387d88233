"""messages.py: everything that crosses between the server (the LLM) and a client (an SLM), spec §2.

A message is a dict of one SCHEMA kind. `send` checks a message's fields and counts its bytes;
`receive` is the receiver's check before any use of it (fields, types, one entry per pooled question,
sizes, finite values), raising BadMessage with the field and the reason.
"""
import math
from collections import Counter

import torch

from methods import METHODS

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
MAX_EVAL_PROBLEMS = 10**6  # a report's evaluation covers at most this many problems


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
    if kind not in SCHEMA or kind == "weights":
        raise BadMessage(f"'{kind}' is not a message kind receive checks (weights: receive_weights)")
    if cfg.get("method") not in METHODS:
        raise BadMessage(f"unknown method {cfg.get('method')!r}: cannot tell which fields '{kind}' has")
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
                try:
                    v = torch.tensor(v, dtype=torch.float64).float()  # an int of 10**400 cannot be one
                except (OverflowError, RuntimeError, TypeError, ValueError):
                    raise BadMessage(f"'{kind}'.{f} holds a number out of range") from None
            if not isinstance(v, torch.Tensor) or not v.is_floating_point() or v.dim() != 1:
                raise BadMessage(f"'{kind}'.{f} must be a 1-D float tensor (or list of numbers)")
            if v.device.type != "cpu":  # e.g. a tensor on the meta device, with no values at all
                raise BadMessage(f"'{kind}'.{f} is a tensor on {v.device.type}, not values a receiver can read")
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
# What else a client sends: FedAvg's weights, and its report (its own figures for the round's log)

def weights_signature(sd: dict) -> dict:
    return {k: (tuple(v.shape), v.dtype) for k, v in sd.items()}


def signature_key(sig: dict) -> str:
    return repr(sorted((k, s, str(d)) for k, (s, d) in sig.items()))


def receive_weights(replies: dict, reference: dict | None = None) -> tuple[dict, dict]:
    """The server's check of FedAvg's "weights" messages, {client: message}: a dict {"state_dict": {name:
    tensor}} whose keys, shapes and dtypes equal the reference (the last average's, else those most
    clients agree on) and whose values are finite. Returns ({client: state_dict} of those that pass,
    {client: BadMessage} of the others): one client's wrong shape, missing key or NaN costs that client its
    round and never reaches the average."""
    sds, bad = {}, {}
    for n, msg in replies.items():
        sd = msg.get("state_dict") if isinstance(msg, dict) and set(msg) == {"state_dict"} else None
        if not isinstance(sd, dict) or not sd or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                         for k, v in sd.items()):
            bad[n] = BadMessage("'weights' must be {'state_dict': {name: tensor}}")
        elif any(v.device.type == "meta" for v in sd.values()):
            bad[n] = BadMessage("'weights' holds tensors without data (meta device)")
        else:
            sds[n] = sd
    if reference is None and sds:  # the signature most clients share (a tie: none, and FedAvg is skipped)
        sigs = [weights_signature(sd) for sd in sds.values()]
        keys = [signature_key(s) for s in sigs]
        ranked = Counter(keys).most_common(2)
        reference = sigs[keys.index(ranked[0][0])] if len(ranked) == 1 or ranked[0][1] > ranked[1][1] else None
    for n in list(sds):
        sig = weights_signature(sds[n])
        why = None
        if reference is None:
            why = "no set of keys, shapes and dtypes is shared by more clients than any other"
        elif set(sig) != set(reference):
            diff = sorted(set(sig) ^ set(reference))
            why = f"keys differ from the model's ({len(diff)} of them, e.g. {diff[0]!r})"
        elif sig != reference:
            k = next(k for k in sig if sig[k] != reference[k])
            why = f"'{k}' is {list(sig[k][0])} {sig[k][1]}, the model's is {list(reference[k][0])} {reference[k][1]}"
        elif any(v.is_floating_point() and not torch.isfinite(v).all() for v in sds[n].values()):
            k = next(k for k, v in sds[n].items() if v.is_floating_point() and not torch.isfinite(v).all())
            why = f"'{k}' holds values that are not finite"
        if why:
            bad[n] = BadMessage(f"'weights': {why}")
            del sds[n]
    return sds, bad


LOSS_KEY_CHARS = 64
PLUGIN_COUNTS, PLUGIN_DELTAS = ("H", "A", "contrast", "imitation", "dropped"), ("dlogp_pos", "dlogp_neg")
EVAL_KEYS = ("accuracy", "strict", "eval_n", "correct")


def receive_report(report, name: str, n_questions: int) -> tuple[dict, list[str]]:
    """The server's check of a client's report: its losses (finite numbers or NaN, plain names), its pick
    count (0..n_questions), its reward (in [0, 1] or None), its v2 diagnostics and its evaluation. Only
    the client's own figures are kept: an evaluation of another party is dropped, with a note. Returns
    (the report, the notes) or raises BadMessage."""
    if not isinstance(report, dict) or not set(report) <= {"losses", "selected", "reward", "plugin", "eval"}:
        raise BadMessage(f"the report of {name} is not a dict of losses, selected, reward, plugin, eval")
    out, notes = {}, []
    losses = report.get("losses", {})
    if not isinstance(losses, dict) or not all(
            isinstance(k, str) and 0 < len(k) <= LOSS_KEY_CHARS and "/" not in k and _number(v) and
            (math.isfinite(v) or math.isnan(v)) for k, v in losses.items()):
        raise BadMessage(f"the report of {name}: 'losses' must map plain names to numbers")
    out["losses"] = {k: float(v) for k, v in losses.items()}
    if "selected" in report:
        if not (isinstance(report["selected"], int) and not isinstance(report["selected"], bool)
                and 0 <= report["selected"] <= n_questions):
            raise BadMessage(f"the report of {name}: 'selected' must be a count in [0, {n_questions}]")
        out["selected"] = report["selected"]
    if report.get("reward") is not None:
        if not (_number(report["reward"]) and 0.0 <= report["reward"] <= 1.0):
            raise BadMessage(f"the report of {name}: 'reward' must be in [0, 1]")
        out["reward"] = float(report["reward"])
    if report.get("plugin") is not None:
        p = report["plugin"]
        ok = isinstance(p, dict) and set(p) <= set(PLUGIN_COUNTS + PLUGIN_DELTAS) and all(
            (isinstance(p[k], int) and not isinstance(p[k], bool) and 0 <= p[k] <= n_questions) for k in PLUGIN_COUNTS
            if k in p) and all(p[k] is None or (_number(p[k]) and math.isfinite(p[k])) for k in PLUGIN_DELTAS if k in p)
        if not ok:
            raise BadMessage(f"the report of {name}: 'plugin' must hold counts in [0, {n_questions}] and finite changes")
        out["plugin"] = dict(p)
    if "eval" in report:
        ev = report["eval"]
        if not isinstance(ev, dict) or set(ev) != set(EVAL_KEYS) or not all(isinstance(ev[k], dict) for k in EVAL_KEYS):
            raise BadMessage(f"the report of {name}: 'eval' must hold {', '.join(EVAL_KEYS)}")
        others = sorted({p for k in EVAL_KEYS for p in ev[k] if p != name}, key=str)
        if others:
            notes.append(f"{name} reported figures of {', '.join(map(str, others))[:200]}: ignored (a client reports its own)")
        mine = {k: ev[k].get(name) for k in EVAL_KEYS}
        acc, strict, n, bits = mine["accuracy"], mine["strict"], mine["eval_n"], mine["correct"]
        sound = (isinstance(n, int) and not isinstance(n, bool) and 0 <= n <= MAX_EVAL_PROBLEMS
                 and all(_number(x) and 0.0 <= x <= 1.0 for x in (acc, strict)))
        if sound and bits is not None:  # a full evaluation: its 0/1 per problem, which the accuracy counts
            sound = (isinstance(bits, str) and len(bits) == n and set(bits) <= {"0", "1"}
                     and abs(bits.count("1") / max(n, 1) - acc) < 1e-6)
        if not sound:
            raise BadMessage(f"the report of {name}: its evaluation is not accuracies in [0, 1] with its 0/1 per problem")
        out["eval"] = {k: ({name: mine[k]} if mine[k] is not None else {}) for k in EVAL_KEYS}
    return out, notes


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)
