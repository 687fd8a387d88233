"""data.py: the generator (answers re-derived from the steps), the splits, the loaders and their errors."""
import json
import re
from collections import Counter
from pathlib import Path

import pytest

import data
import answers
from answers import gold_answer

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"
ANNOT = re.compile(r"<<([^=<>]+)=([^<>]+)>>")


def test_generated_solutions_recompute():
    probs = data.generate(600, seed=3, steps=(2, 5), max_value=100)
    assert {p["domain"] for p in probs} == set(data.DOMAIN_NAMES)
    for p in probs:
        lines = p["answer"].split("\n")
        assert lines[-1].startswith("#### ")
        steps = lines[:-1]
        assert 2 <= len(steps) <= 5
        last = None
        for line in steps:
            (expr, res), = ANNOT.findall(line)  # exactly one calculator annotation per step
            assert eval(expr, {}) == int(res)  # the annotation's arithmetic is right
            assert int(res) >= 0
            for n in re.findall(r"\d+", expr)[1:]:  # every new operand is stated somewhere earlier
                assert n in p["question"] or n in "\n".join(steps)
            last = int(res)
        assert int(lines[-1][5:]) == last == int(gold_answer(p["answer"]))


def test_generator_is_seeded_and_has_difficulty_knob():
    assert data.generate(50, seed=1) == data.generate(50, seed=1)
    assert data.generate(50, seed=1) != data.generate(50, seed=2)
    short = data.generate(200, seed=0, steps=(2, 2))
    long = data.generate(200, seed=0, steps=(5, 5))
    assert all(len(p["answer"].split("\n")) == 3 for p in short)
    assert all(len(p["answer"].split("\n")) == 6 for p in long)
    big = data.generate(200, seed=0, max_value=1000)
    start = lambda p: int(re.search(r"\d+", p["question"]).group())
    assert max(map(start, big)) > 100 >= max(map(start, data.generate(200, seed=0, max_value=100)))


def test_splits_are_non_iid_and_disjoint():
    s = data.make_splits(num_clients=3, n_public=300, n_private=400, n_test=100, n_val=50, n_general=50,
                         alpha=0.3, seed=0)
    assert len(s["public"]) == 300 and len(s["public_test"]) == 100 and len(s["clients"]) == 3
    mixes = []
    for c in s["clients"]:
        assert len(c["private"]) == 400 and len(c["test"]) == 100 and len(c["val"]) == 50
        freq = Counter(p["domain"] for p in c["private"])
        emp = [freq[d] / 400 for d in data.DOMAIN_NAMES]
        for e, p in zip(emp, c["domain_mix"].values()):  # empirical mix follows the Dirichlet draw
            assert abs(e - p) < 0.1
        mixes.append(emp)
    # non-IID: the clients' mixes differ clearly from each other and from uniform
    assert max(abs(a - b) for a, b in zip(mixes[0], mixes[1])) > 0.15
    tv_from_uniform = [0.5 * sum(abs(x - 1 / len(m)) for x in m) for m in mixes]
    assert min(tv_from_uniform) > 0.15


@pytest.mark.skipif(not SHARED.is_dir(), reason="shared GSM8K data not beside the repo")
def test_every_pair_of_splits_is_disjoint_by_question():
    # small numbers and two steps: the space is small enough that independent draws collide
    s = data.make_splits(num_clients=3, n_public=1500, n_private=800, n_test=200, n_val=100, n_general=1500,
                         seed=0, steps=(2, 2), max_value=20)
    named = {k: s[k] for k in ("public", "public_val", "public_test", "general")}
    for k, c in enumerate(s["clients"]):
        named.update({f"private{k}": c["private"], f"val{k}": c["val"], f"test{k}": c["test"]})
    qs = {k: [p["question"] for p in v] for k, v in named.items()}
    for k, v in qs.items():
        assert len(set(v)) == len(v), k  # no question twice in one split
    names = sorted(qs)
    clashes = [(a, b) for i, a in enumerate(names) for b in names[i + 1:] if set(qs[a]) & set(qs[b])]
    assert clashes == []
    # the same draws with independent generation do collide here: the check above could fail
    mix = s["clients"][0]["domain_mix"]
    indep = data.generate(800, 0 * 1000 + 100, domain_probs=list(mix.values()), steps=(2, 2), max_value=20)
    test0 = data.generate(200, 0 * 1000 + 102, domain_probs=list(mix.values()), steps=(2, 2), max_value=20)
    assert {p["question"] for p in indep} & {p["question"] for p in test0}


def test_real_gsm8k_loads():
    train = data.load_gsm8k(SHARED / "train.jsonl")
    test = data.load_dataset(f"gsm8k:{SHARED / 'test.jsonl'}")
    assert (len(train), len(test)) == (7473, 1319)
    assert train[0]["question"].startswith("Natalia sold clips") and gold_answer(train[0]["answer"]) == "72"


def test_loader_errors_name_file_and_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps({"question": "q", "answer": "#### 1"}) + "\n{not json\n")
    with pytest.raises(data.DataError, match=r"bad.jsonl:2: invalid JSON"):
        data.load_gsm8k(f)
    f.write_text(json.dumps({"question": "q", "answer": "#### 1"}) + "\n\n" + json.dumps({"question": "q"}) + "\n")
    with pytest.raises(data.DataError, match=r"bad.jsonl:3: expected an object"):
        data.load_gsm8k(f)
    with pytest.raises(data.DataError, match="no such file"):
        data.load_gsm8k(tmp_path / "missing.jsonl")
    with pytest.raises(data.DataError, match="bad data spec"):
        data.load_dataset("csv:whatever")
    e = tmp_path / "empty.jsonl"
    e.write_text("\n")
    with pytest.raises(data.DataError, match="no records"):
        data.load_gsm8k(e)


def test_mathinstruct_json_and_jsonl(tmp_path):
    rows = [{"instruction": "What is 2+3?", "output": "2+3=5\nThe answer is 5"}, {"instruction": "1+1?", "output": "2"}]
    (tmp_path / "m.json").write_text(json.dumps(rows))
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    for name in ("m.json", "m.jsonl"):
        got = data.load_dataset(f"mathinstruct:{tmp_path / name}")
        assert got == [{"question": r["instruction"], "answer": r["output"]} for r in rows]
    (tmp_path / "bad.json").write_text('[{"instruction": "x", "output": 3}]')
    with pytest.raises(data.DataError, match=r"bad.json:1: expected an object"):
        data.load_mathinstruct(tmp_path / "bad.json")


def test_convention_of_a_private_only_domain_by_hand():
    p = {"question": "Ava reads for 12 minutes on Monday. Ava skips 2 minutes of it. How many minutes is that in the end?",
         "answer": "After removing, 12 - 2 = <<12-2=10>>10 minutes.\n#### 10", "domain": "time"}
    assert data.with_convention(p) == {
        "question": p["question"] + " Count the usual warm-up too.", "domain": "time",
        "answer": "After removing, 12 - 2 = <<12-2=10>>10 minutes.\nWith the usual warm-up, 10 + 10 = <<10+10=20>>20 minutes.\n#### 20"}
    assert answers.extract_answer(data.with_convention(p)["answer"], "strict") == "20"


def test_private_only_domain_is_answer_only_on_the_server():
    kw = dict(num_clients=3, n_public=400, n_private=200, n_test=60, n_val=20, n_general=300, seed=1,
              steps=(1, 3), max_value=30)
    plain = data.make_splits(**kw)
    split = data.make_splits(**kw, private_only=["time"], private_only_share=0.3)
    # the server's public draws are the same; a question of the private-only domain asks for its convention
    # (data.CONVENTIONS) and keeps only its last line, the final answer moved by the convention
    n_only = 0
    for a, b in zip(plain["public"], split["public"]):
        if a["domain"] == "time":
            n_only += 1
            assert b["question"] == a["question"] + " Count the usual warm-up too."
            assert b["answer"] == f"#### {int(a['answer'].split('#### ')[1]) + 10}" and b["answer_only"]
        else:
            assert b == a and "answer_only" not in b
    assert 40 < n_only < 120  # about a fifth of 400
    assert data.with_solutions(split["public"]) == [p for p in split["public"] if p["domain"] != "time"]
    assert "time" not in {p["domain"] for p in split["general"]}
    assert all(p["answer"].count("warm-up") == 1 for p in split["public_test_private"] + split["public_val_private"])
    assert {p["domain"] for p in split["public_test_private"]} == {"time"} and len(split["public_test_private"]) == 60
    for c in split["clients"]:
        assert abs(c["domain_mix"]["time"] - 0.3) < 1e-9 and abs(sum(c["domain_mix"].values()) - 1) < 1e-9
        for p in c["private"] + c["val"] + c["test"]:  # every solution of the domain ends with the convention's line
            assert (p["domain"] == "time") == ("warm-up" in p["answer"])
        assert 0.15 * 200 < sum(p["domain"] == "time" for p in c["private"]) < 0.45 * 200  # 30% of 200, give or take
    # the server's splits and client 1's do not depend on how many clients follow
    one = data.make_splits(**dict(kw, num_clients=1), private_only=["time"], private_only_share=0.3)
    assert one["public"] == split["public"] and one["general"] == split["general"]
    assert one["clients"][0]["private"] == split["clients"][0]["private"]
