"""messages.py: everything that crosses between the server (the LLM) and a client (an SLM), spec §2.

A message is a dict of one SCHEMA kind. `send` checks a message's fields and counts its bytes;
`receive` is the receiver's check before any use of it (fields, types, one entry per pooled question,
sizes, finite values), raising BadMessage with the field and the reason.
"""
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
