"""data.py: GSM8K-style reasoning data for LaDa (spec §1, §6).

- a seeded generator of multi-step word problems in five domains, with solutions written as GSM8K
  writes them (one step a line, `<<a*b=c>>` calculator annotations, last line `#### N`);
- the federated splits: a public pool mixing all domains, per-client private sets with a
  Dirichlet(alpha) domain mix (non-IID), per-party validation and test sets;
- loaders for real files: GSM8K JSONL (`question`/`answer`) and MathInstruct-style JSON/JSONL
  (`instruction`/`output`).
"""
import itertools
import json
import random
from pathlib import Path

import numpy as np

from answers import extract_answer

PROMPT = "Question: {question}\nAnswer:\n"  # a path y is the text that follows the prompt; EOS ends it


def format_prompt(question: str) -> str:
    """The prompt every model sees before a reasoning path (same for all tokenizers)."""
    return PROMPT.format(question=question.strip())


class DataError(ValueError):
    """A user-facing data problem; the message names the file and line."""


# -----------------------------------------------------------------------------
# Generator. A problem is a chain: a start quantity v, then steps that each combine v with a new
# number (add, sub, mul, div, percent, or a two-line "k items at c each" purchase). Every step has
# several phrasings for the question and for the solution line.

NAMES = ["Ava", "Ben", "Carla", "Dev", "Elena", "Farid", "Grace", "Hugo", "Iris", "Jamal", "Kai",
         "Lena", "Mateo", "Nora", "Omar", "Priya", "Quinn", "Rosa", "Sam", "Tariq", "Uma", "Victor"]

# each domain: start sentences, the unit (prefix, suffix) of v in solution lines, the question, and per op a
# list of question phrasings; {P} is the person, {b}/{k}/{c} the step's numbers, {x} a thing
DOMAINS = {
    "shopping": dict(
        start=["{P} has ${a}.", "{P} starts the week with ${a} in savings.", "{P} brings ${a} to the mall."],
        unit=("$", ""),
        ask=["How many dollars does {P} have now?", "How much money, in dollars, does {P} have at the end?"],
        things=["a book", "a scarf", "lunch", "a game", "shoes", "a lamp", "paint", "a ticket"],
        items=["notebooks", "pens", "apples", "candles", "stickers", "mugs"],
        add=["{P} earns ${b} from a weekend job.", "{P} gets ${b} as a gift.", "Then {P} sells an old bike for ${b}."],
        sub=["{P} spends ${b} on {x}.", "{P} pays ${b} for {x}.", "Then {P} buys {x} for ${b}."],
        mul=["{P} invests it and the money grows to {b} times as much.", "A contest multiplies {P}'s money by {b}."],
        div=["{P} splits the money equally into {b} envelopes and keeps one envelope.",
             "{P} shares it equally with friends so that each of {b} people gets the same, and keeps one share."],
        pct=["{P} spends {p}% of the money on rent."],
        buy=["{P} buys {k} {xs} that cost ${c} each.", "{P} orders {k} {xs} at ${c} apiece."],
    ),
    "rates": dict(
        start=["A machine makes {a} parts in the first hour.", "A bakery bakes {a} loaves by noon.",
               "A printer prints {a} pages before lunch."],
        unit=("", ""),
        ask=["How many items are there in total now?", "How many items are left at the end?"],
        things=["a box", "a crate", "an order"], items=["boxes", "crates", "orders"],
        add=["In the next hour it makes {b} more.", "A second shift adds {b} more."],
        sub=["Then {b} of them are found broken and thrown away.", "A customer takes {b} of them."],
        mul=["Running {b} times as long gives {b} times as many.", "With {b} identical machines the output is {b} times larger."],
        div=["They are packed equally into {b} crates, and one crate is kept.",
             "The output is shared equally among {b} shops, and one shop's share is counted."],
        pct=["{p}% of them are shipped away."],
        buy=["Then {k} {xs} of {c} items each are sent out.", "Then {k} {xs} holding {c} items each leave the shop."],
    ),
    "percent": dict(
        start=["A school has {a} students.", "A library owns {a} books.", "A farm has {a} chickens."],
        unit=("", ""),
        ask=["How many are there now?", "What is the final count?"],
        things=["a group", "a batch"], items=["groups", "batches"],
        add=["Then {b} more arrive.", "Later {b} new ones are added."],
        sub=["Then {b} leave.", "Then {b} are given away."],
        mul=["Over the years the number becomes {b} times as large.", "The number is multiplied by {b}."],
        div=["Only one out of every {b} of them stays.", "Exactly 1/{b} of them stay."],
        pct=["Then {p}% of them leave.", "{p}% of them are moved elsewhere."],
        buy=["Then {k} {xs} of {c} each leave.", "Then {k} {xs} with {c} in each are removed."],
    ),
    "geometry": dict(
        start=["A rope is {a} meters long.", "A fence is {a} meters long.", "A garden path is {a} meters long."],
        unit=("", " meters"),
        ask=["How many meters long is it now?", "What is the final length in meters?"],
        things=["a piece", "a section"], items=["pieces", "sections"],
        add=["Then {b} meters are added to it.", "It is extended by {b} meters."],
        sub=["Then {b} meters are cut off.", "{b} meters are removed."],
        mul=["It is replaced by one {b} times as long.", "The length is multiplied by {b}."],
        div=["It is cut into {b} equal parts and one part is kept.", "It is folded into {b} equal parts and one part is used."],
        pct=["{p}% of the length is cut away."],
        buy=["Then {k} {xs} of {c} meters each are cut off.", "Then {k} {xs}, each {c} meters long, are removed."],
    ),
    "time": dict(
        start=["{P} reads for {a} minutes on Monday.", "{P} practices piano for {a} minutes.",
               "{P} trains for {a} minutes in the morning."],
        unit=("", " minutes"),
        ask=["How many minutes is that in the end?", "How many minutes does it come to?"],
        things=["a session", "a break"], items=["sessions", "breaks"],
        add=["Then {P} adds {b} more minutes.", "{P} spends another {b} minutes."],
        sub=["{P} skips {b} minutes of it.", "{b} minutes are lost to a phone call."],
        mul=["Over the week {P} does {b} times as much.", "The next month {P} spends {b} times that long."],
        div=["{P} spreads it equally over {b} days and counts one day.", "It is split equally into {b} blocks; count one block."],
        pct=["{P} cuts {p}% of the time."],
        buy=["{P} then drops {k} {xs} of {c} minutes each.", "{k} {xs} of {c} minutes each are cancelled."],
    ),
}
DOMAIN_NAMES = list(DOMAINS)

# solution lines, one per step; {s} the subject word for v
SOLUTION = {
    "add": ["{s} {v} + {b} = {pre}<<{v}+{b}={r}>>{r}{suf}.", "After adding, {v} + {b} = {pre}<<{v}+{b}={r}>>{r}{suf}."],
    "sub": ["{s} {v} - {b} = {pre}<<{v}-{b}={r}>>{r}{suf}.", "After removing, {v} - {b} = {pre}<<{v}-{b}={r}>>{r}{suf}."],
    "mul": ["{s} {v} * {b} = {pre}<<{v}*{b}={r}>>{r}{suf}.", "Multiplying, {v} * {b} = {pre}<<{v}*{b}={r}>>{r}{suf}."],
    "div": ["{s} {v} / {b} = {pre}<<{v}/{b}={r}>>{r}{suf}.", "One share is {v} / {b} = {pre}<<{v}/{b}={r}>>{r}{suf}."],
    "pct_part": ["{p}% of {v} is {v} * {p} / 100 = {pre}<<{v}*{p}/100={c}>>{c}."],
    "buy_part": ["{k} {xs} make {k} * {c} = <<{k}*{c}={m}>>{m}."],
}
SUBJECT = ["That leaves", "Now there is", "The total is"]
# What a private-only domain holds that no other domain shows (the testbed's knowledge split, docs/study.md,
# "The testbed"): a question asks for it in words, and only the domain's own solutions say what it
# is, in a last line before "#### N". The LLM has never seen such a solution, so it cannot work this
# line out from the other domains; a client's data teach it.
CONVENTIONS = {"time": dict(ask="Count the usual warm-up too.", extra=10,
                            line="With the usual warm-up, {v} + {w} = <<{v}+{w}={r}>>{r} minutes.")}


def _step(rng, dom, op, v, max_value):
    """One step on v. Returns (question sentence template args, solution lines, new v) or None."""
    if op == "add":
        b = rng.randint(2, max_value // 2)
        return dict(b=b), [("add", dict(b=b, r=v + b))], v + b
    if op == "sub":
        if v < 4:
            return None
        b = rng.randint(1, v - 1)
        return dict(b=b), [("sub", dict(b=b, r=v - b))], v - b
    if op == "mul":
        b = rng.randint(2, 5)
        if v * b > 20 * max_value:
            return None
        return dict(b=b), [("mul", dict(b=b, r=v * b))], v * b
    if op == "div":
        divs = [d for d in range(2, 11) if v % d == 0]
        if not divs:
            return None
        b = rng.choice(divs)
        return dict(b=b), [("div", dict(b=b, r=v // b))], v // b
    if op == "pct":
        ps = [p for p in (10, 20, 25, 50, 75) if v * p % 100 == 0]
        if not ps:
            return None
        p = rng.choice(ps)
        c = v * p // 100
        return dict(p=p), [("pct_part", dict(p=p, c=c)), ("sub", dict(b=c, r=v - c))], v - c
    if op == "buy":
        k, c = rng.randint(2, 9), rng.randint(2, 12)
        if k * c >= v:
            return None
        xs = rng.choice(dom["items"])
        return dict(k=k, c=c, xs=xs), [("buy_part", dict(k=k, c=c, m=k * c, xs=xs)), ("sub", dict(b=k * c, r=v - k * c))], v - k * c
    raise ValueError(op)


def make_problem(rng: random.Random, domain: str, steps: int, max_value: int = 100) -> dict:
    """One problem with `steps` solution lines (a two-line step counts two). Deterministic in rng."""
    dom = DOMAINS[domain]
    P = rng.choice(NAMES)
    v = rng.randint(max(10, max_value // 5), max_value)
    sentences = [rng.choice(dom["start"]).format(P=P, a=v)]
    lines = []
    while len(lines) < steps:
        ops = ["add", "sub", "mul", "div", "pct", "buy"]
        if steps - len(lines) < 2:
            ops = ops[:4]  # two-line steps only where they fit
        got = None
        while got is None:
            op = rng.choice(ops)
            got = _step(rng, dom, op, v, max_value)
        args, sol, v_new = got
        sentences.append(rng.choice(dom[op]).format(P=P, x=rng.choice(dom["things"]), **args))
        for kind, a in sol:
            pre, suf = dom["unit"]
            lines.append(rng.choice(SOLUTION[kind]).format(s=rng.choice(SUBJECT), v=v, pre=pre, suf=suf, **a))
        v = v_new
    sentences.append(rng.choice(dom["ask"]).format(P=P))
    answer = "\n".join(lines) + f"\n#### {v}"
    return {"question": " ".join(sentences), "answer": answer, "domain": domain}


def _problems(seed: int, domains=None, domain_probs=None, steps=(2, 5), max_value=100):
    """An endless seeded stream of problems; each picks a domain (by domain_probs) and a step count
    in [steps[0], steps[1]]."""
    rng = random.Random(seed)
    domains = list(domains or DOMAIN_NAMES)
    while True:
        d = rng.choices(domains, weights=domain_probs)[0]
        yield make_problem(rng, d, rng.randint(*steps), max_value)


def generate(n: int, seed: int, domains=None, domain_probs=None, steps=(2, 5), max_value=100) -> list[dict]:
    """The first n problems of the stream of `seed`."""
    return list(itertools.islice(_problems(seed, domains, domain_probs, steps, max_value), n))


def _distinct(n: int, seed: int, seen: set, domain_probs=None, steps=(2, 5), max_value=100) -> list[dict]:
    """Like `generate` (the same draws while nothing collides), but skipping any problem whose question
    is already in `seen`; the questions taken are added to it."""
    out = []
    for tries, p in enumerate(_problems(seed, None, domain_probs, steps, max_value), 1):
        if len(out) == n:
            break
        if tries > 50 * n + 1000:
            raise DataError(f"cannot draw {n} problems with distinct questions (steps {steps}, max_value {max_value}): "
                            "raise --max_value or --max_steps, or ask for fewer")
        if p["question"] not in seen:
            seen.add(p["question"])
            out.append(p)
    return out


def with_convention(p: dict) -> dict:
    """Problem p with its domain's convention (CONVENTIONS): the ask in the question, one more line
    in the solution, the final answer moved by it."""
    c = CONVENTIONS[p["domain"]]
    lines, v = p["answer"].rsplit("\n#### ", 1)
    v, w = int(v), c["extra"]
    return dict(p, question=f"{p['question']} {c['ask']}",
                answer=f"{lines}\n{c['line'].format(v=v, w=w, r=v + w)}\n#### {v + w}")


def make_splits(num_clients: int, n_public: int, n_private: int, n_test: int, n_val: int,
                n_general: int = 0, alpha: float = 0.5, seed: int = 0, steps=(2, 5), max_value=100,
                private_only=(), private_only_share: float = 0.0) -> dict:
    """The federated splits of spec §1 on generated data, disjoint by question text.

    public/public_val/public_test mix all domains uniformly (the server's data); client k's
    private/val/test sets all follow one domain mix p_k ~ Dirichlet(alpha) (non-IID); `general`
    is extra data for the LLM's warm-up only. The server's splits are drawn first, then each
    client's (test, val, private) in turn, each skipping every question drawn before it: no question
    is in two splits (nor twice in one), and neither the server's splits nor client k's depend on
    how many clients follow (so `one2one` shares the LLM and client 1 of `hetero`).

    private_only (the testbed's knowledge split, docs/study.md, "The testbed"): domains whose solutions
    only the clients hold. `general` has none of them; the public pool holds their questions with
    the final answer alone ("#### N", marked "answer_only": every party can check a path, none can
    train on a solution); each client's mix gives them exactly private_only_share in all (equal
    parts), the shared domains the rest by Dirichlet(alpha); and
    `public_test_private` (`public_val_private`) holds n_test (n_val) problems of these domains, the
    LLM's test (validation) set of them.
    """
    private_only = list(private_only)
    for d in private_only:
        if d not in DOMAINS:
            raise DataError(f"unknown domain '{d}' (domains: {', '.join(DOMAIN_NAMES)})")
    rs = np.random.default_rng(seed)
    mixes = []
    only = np.array([d in private_only for d in DOMAIN_NAMES])
    for _ in range(num_clients):
        if private_only:  # the shared domains by Dirichlet in 1 - share, the private-only ones equally in share
            p = np.where(only, private_only_share / only.sum(), 0.0)
            p[~only] = (1 - private_only_share) * rs.dirichlet([alpha] * int((~only).sum()))
        else:
            p = rs.dirichlet([alpha] * len(DOMAIN_NAMES))
        mixes.append(p.tolist())
    seen = set()
    gen = lambda n, s, probs=None: _distinct(n, s, seen, probs, steps, max_value)
    base = lambda k: seed * 1000 + 100 * (k + 1)
    shared = [0.0 if d in private_only else 1.0 for d in DOMAIN_NAMES]  # the domains the server knows
    splits = {"public_test": gen(n_test, seed * 1000 + 3), "public_val": gen(n_val, seed * 1000 + 2),
              "public": gen(n_public, seed * 1000 + 1), "general": gen(n_general, seed * 1000 + 4, shared),
              "public_test_private": (gen(n_test, seed * 1000 + 5, [1.0 - x for x in shared]) if private_only else []),
              "public_val_private": (gen(n_val, seed * 1000 + 6, [1.0 - x for x in shared]) if private_only else []),
              "clients": []}
    for k, p in enumerate(mixes):
        test, val, private = gen(n_test, base(k) + 2, p), gen(n_val, base(k) + 1, p), gen(n_private, base(k), p)
        splits["clients"].append({"domain_mix": dict(zip(DOMAIN_NAMES, p)), "private": private, "val": val, "test": test})
    parts = [v for k, v in splits.items() if k != "clients"] + [c[k] for c in splits["clients"] for k in ("private", "val", "test")]
    for part in parts:  # a private-only domain's convention, in every split it appears in
        part[:] = [with_convention(p) if p["domain"] in private_only and p["domain"] in CONVENTIONS else p for p in part]
    for p in splits["public"]:  # the server sees a private-only question with its final answer alone
        if p["domain"] in private_only:
            p["answer"], p["answer_only"] = p["answer"].rsplit("\n", 1)[-1], True
    return splits


def with_solutions(examples: list[dict]) -> list[dict]:
    """The examples a party can train on: those whose answer is a whole solution, not a final answer alone."""
    return [e for e in examples if not e.get("answer_only")]


# -----------------------------------------------------------------------------
# Loaders for real files

def _read_records(path: Path):
    """Yield (line_number, dict) from a JSONL file or a JSON list; DataError names file and line."""
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text") from None
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
        except RecursionError:
            raise DataError(f"{path}: JSON nested too deeply") from None
        yield from ((i + 1, r) for i, r in enumerate(rows))  # "line" = 1-based record number here
        return
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield i, json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{i}: invalid JSON ({e.msg})") from None
        except RecursionError:
            raise DataError(f"{path}:{i}: JSON nested too deeply") from None


def _load(path, qkey: str, akey: str, strict: bool) -> list[dict]:
    """Records with a non-empty question and an answer that holds a gradable number ("#### N" with
    strict, any number otherwise; answers.extract_answer)."""
    path = Path(path)
    out = []
    for i, r in _read_records(path):
        if not isinstance(r, dict) or not isinstance(r.get(qkey), str) or not isinstance(r.get(akey), str):
            raise DataError(f"{path}:{i}: expected an object with string fields '{qkey}' and '{akey}'")
        if not r[qkey].strip():
            raise DataError(f"{path}:{i}: empty '{qkey}'")
        if extract_answer(r[akey], "strict" if strict else "flexible") is None:
            raise DataError(f"{path}:{i}: '{akey}' has no final answer to grade against "
                            + ("(GSM8K ends it with '#### N')" if strict else "(no number)"))
        out.append({"question": r[qkey], "answer": r[akey]})
    if not out:
        raise DataError(f"{path}: no records")
    return out


def load_gsm8k(path) -> list[dict]:
    """GSM8K JSONL: {"question": ..., "answer": "...\\n#### N"} per line."""
    return _load(path, "question", "answer", strict=True)


def load_mathinstruct(path) -> list[dict]:
    """MathInstruct-style JSON list or JSONL: {"instruction": ..., "output": ...}."""
    return _load(path, "instruction", "output", strict=False)


LOADERS = {"gsm8k": load_gsm8k, "mathinstruct": load_mathinstruct}


def load_dataset(spec: str) -> list[dict]:
    """'gsm8k:PATH' or 'mathinstruct:PATH' -> list of {"question", "answer"}."""
    kind, sep, path = spec.partition(":")
    if not sep or kind not in LOADERS or not path:
        raise DataError(f"bad data spec '{spec}': expected one of {', '.join(k + ':PATH' for k in LOADERS)}")
    return LOADERS[kind](path)

