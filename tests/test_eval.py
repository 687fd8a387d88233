"""eval.py: the grader against OpenAI's labels and the real GSM8K files; generate() on tiny models."""
import json
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # until tests/conftest.py does it

import answers  # noqa: E402
import eval as ev  # noqa: E402
import models  # noqa: E402
from data import format_prompt  # noqa: E402

GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"  # ../shared beside the clone


def _jsonl(name):
    path = GSM8K / name
    if not path.is_file():
        pytest.skip(f"{path} not found (the shared GSM8K files sit in ../shared/data/gsm8k beside the repo)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

# -----------------------------------------------------------------------------
# The grader against independent truths


def test_agrees_with_openai_labels():
    """OpenAI's example_model_solutions.jsonl: 1,319 test questions x 4 models, each solution labelled
    is_correct by OpenAI; their ground truths end in "A: N" rather than "#### N"."""
    rows = _jsonl("example_model_solutions.jsonl")
    agree, total, wrong = 0, 0, []
    for row in rows:
        for key, sol in row.items():
            if not isinstance(sol, dict):
                continue
            ours = answers.is_correct(sol["solution"], row["ground_truth"])
            total += 1
            agree += ours == sol["is_correct"]
            if ours != sol["is_correct"]:
                wrong.append((key, sol["is_correct"], sol["solution"][-80:], row["ground_truth"][-20:]))
    assert total == 5276
    print(f"agreement with OpenAI is_correct labels: {agree}/{total}")
    assert agree >= 0.995 * total, wrong[:10]
    # the strict grader knows only "####", so it must call every one of these "A: N" solutions wrong
    assert not any(answers.is_correct(row["6b_finetuning"]["solution"], row["ground_truth"], "strict") for row in rows[:50])


def test_checked_grading_accepts_every_gsm8k_gold_and_rejects_garbled_paths():
    """checked = strict + every calculator annotation computes. Truth 1: all 8,792 GSM8K gold solutions
    (whose annotations a calculator wrote) pass. Truth 2: paths a weak testbed SLM wrote, whose last
    number happens to be the answer (copied from results/testbed/superseded/headroom_v2_flexible/)."""
    rows = _jsonl("train.jsonl") + _jsonl("test.jsonl")
    assert len(rows) == 8792
    assert all(answers.is_correct(r["answer"], r["answer"], "checked") for r in rows)
    garbled = [("After adding, 12 + 12 + 18 = <<12=9>>19.\n#### + 1", "1", (True, False, False)),
               (" * 9 = <<1*30/3=10>>.\n#### ual is 3", "3", (True, False, False)),
               ("After adding, 1 - Now there is 1 = <<10-8=6>>6 meters.\n#### 6 2", "6", (True, True, False)),
               ("After removing, 111 - 5 = <<1-7=8>>8 meters.\n#### 6", "6", (True, True, False)),
               ("After removing, 11 - 5 = <<11-5=6>>6 meters.\n#### 6", "6", (True, True, True)),
               ("10% of 20 is 20 * 10 / 100 = <<20*10/100=2>>2.\nThat leaves 20 - 2 = <<20-2=18>>18.\n#### 18", "18", (True, True, True)),
               ("<<7/0=1>>\n#### 1", "1", (True, True, False)), ("<<2**3=8>>\n#### 8", "8", (True, True, False)),
               ("<<__import__('os')=0>>\n#### 0", "0", (True, True, False)), ("no annotation\n#### 4", "4", (True, True, True))]
    for path, gold, want in garbled:
        assert tuple(answers.is_correct(path, f"#### {gold}", m) for m in ("flexible", "strict", "checked")) == want, path


@pytest.mark.parametrize("split", ["train.jsonl", "test.jsonl"])
def test_strict_extracts_every_gsm8k_gold(split):
    rows = _jsonl(split)
    for row in rows:
        tail = row["answer"].split("####")[-1].strip().replace(",", "")  # parsed without eval.py
        expected = str(int(tail)) if tail.lstrip("-").isdigit() else str(Decimal(tail).normalize())
        assert answers.extract_answer(row["answer"], "strict") == expected, row["answer"][-40:]
        assert answers.is_correct(row["answer"], row["answer"], "strict")
    assert len(rows) in (7473, 1319)


@pytest.mark.parametrize("text, strict, flexible", [
    ("3 + 4 = <<3+4=7>>7\n#### 7", "7", "7"),
    ("#### 1,234", "1234", "1234"),                       # thousands commas
    ("#### -5", "-5", "-5"),                              # negative
    ("####  $18.00", "18", "18"),                         # "$", trailing zeros
    ("She makes $18.", None, "18"),                       # "$", trailing period
    ("The answer is 18.00.", None, "18"),
    ("So the answer is $1,250,000.", None, "1250000"),
    ("The answer is -3 degrees.", None, "-3"),
    ("Temperature drops to -12 tonight", None, "-12"),
    ("She has 20-3=17 left and 5 more.", None, "5"),    # last number
    ("16-3", None, "3"),                                  # a minus after a digit is subtraction
    ("It costs 0.50 dollars", None, "0.5"),
    ("Half is .5", None, "0.5"),
    ("A: 2,125\n", None, "2125"),                         # OpenAI's sample format
    ("Answer: 42 apples, 7 boxes", None, "42"),           # a cue beats the last number
    ("The answer is 12. Check: 12 * 2 = 24", None, "12"),
    ("First answer is 3.\nThe answer is 4.", None, "4"),  # the last cue
    ("#### 9\nThe answer is 4", "9", "9"),                # "####" wins
    ("no number at all", None, None),
    ("", None, None),
])
def test_extract_answer_rules(text, strict, flexible):
    assert answers.extract_answer(text, "strict") == strict
    assert answers.extract_answer(text, "flexible") == flexible
    assert answers.extract_answer(text) == flexible  # flexible is the default


def test_extract_answer_unknown_mode():
    with pytest.raises(ValueError, match="unknown mode"):
        answers.extract_answer("#### 3", "loose")


@pytest.mark.parametrize("completion, gold, expected", [
    ("The answer is 18.", "18", True),
    ("#### 18.00", "18", True),
    ("#### 1234", "1,234", True),
    ("The answer is $1,234", "$1234", True),
    ("#### 0.5", "0.50", True),
    ("#### -7", "-7", True),
    ("#### 7", "-7", False),
    ("#### 17", "18", False),
    ("no idea", "18", False),
    ("steps\n#### 72", "Natalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72", True),
    ("steps\n#### 71", "Natalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72", False),
])
def test_is_correct(completion, gold, expected):
    assert answers.is_correct(completion, gold) is expected


def test_is_correct_strict_needs_marker():
    assert answers.is_correct("The answer is 18", "18", "flexible")
    assert not answers.is_correct("The answer is 18", "18", "strict")
    with pytest.raises(ValueError, match="gold"):
        answers.is_correct("#### 3", "no number")


@pytest.mark.parametrize("text, cut", [
    ("a = 2\n#### 2\nQuestion: next", "a = 2\n#### 2"),
    ("#### 2\n", "#### 2"),
    ("a = 2\n#### 2", "a = 2\n#### 2"),  # ended by EOS or the token limit: kept whole
    ("no marker\nat all\n", "no marker\nat all\n"),
    ("x\n#### 1,000 dollars\n#### 5\n", "x\n#### 1,000 dollars"),
])
def test_cut_after_answer(text, cut):
    assert ev._cut_after_answer(text) == cut

# -----------------------------------------------------------------------------
# generate() on tiny random models

CORPUS = [format_prompt(q) + a for q, a in [
    ("Ava has 3 apples and buys 4 more. How many?", "3 + 4 = <<3+4=7>>7\n#### 7"),
    ("A box holds 12 pens. How many pens are in 5 boxes?", "12 * 5 = <<12*5=60>>60\n#### 60"),
    ("Ben had $20 and spent $8. How much is left?", "20 - 8 = $<<20-8=12>>12\n#### 12"),
]]
PROMPTS = [  # mixed lengths, so batches need left padding
    format_prompt("Ava has 3 apples."),
    format_prompt("A box holds 12 pens. How many pens are in 5 boxes if 2 boxes are lost?"),
    format_prompt("Ben had $20."),
    format_prompt("How many?"),
    format_prompt("Carla reads 15 pages a day for 6 days, then 9 pages. How many pages?"),
]


@pytest.fixture(scope="module")
def tok():
    return models.build_tokenizer("bpe", CORPUS * 5, vocab_size=300)


def _tiny(arch, tok, dtype=torch.float64):
    model = models.build_model(arch, tok, **{k: v for k, v in models.ZOO[f"{arch}-tiny"].items() if k != "arch"})
    return model.to(dtype)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_greedy_batched_equals_one_at_a_time(tok, arch):
    model = _tiny(arch, tok)
    model.train()
    batched = ev.generate(model, tok, PROMPTS, max_new_tokens=24, batch_size=3)
    assert model.training  # mode restored
    single = [ev.generate(model, tok, [p], max_new_tokens=24)[0] for p in PROMPTS]
    assert batched == single  # same order, and left padding changes nothing
    assert len(set(batched)) > 1 and all(batched)  # a test that could fail: distinct, non-empty paths
    assert ev.generate(model, tok, PROMPTS, max_new_tokens=24, batch_size=2) == batched  # deterministic
    assert ev.generate(model, tok, []) == []


def test_sampling_is_seeded_and_leaves_global_rng(tok):
    model = _tiny("llama", tok, torch.float32)
    state = torch.get_rng_state()
    a = ev.generate(model, tok, PROMPTS, max_new_tokens=16, temperature=1.0, batch_size=2, seed=123)
    assert torch.equal(torch.get_rng_state(), state)
    b = ev.generate(model, tok, PROMPTS, max_new_tokens=16, temperature=1.0, batch_size=2, seed=123)
    c = ev.generate(model, tok, PROMPTS, max_new_tokens=16, temperature=1.0, batch_size=2, seed=124)
    assert a == b
    assert a != c


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_filled_cache_gives_the_tokens_of_transformers_own_cache(tok, arch, temperature, monkeypatch):
    """generate() writes keys and values in place (_FilledLayer); transformers' DynamicCache, which
    concatenates, is the reference: the same paths token for token, greedy and sampled, left-padded."""
    model = _tiny(arch, tok, torch.float32)
    torch.manual_seed(0)
    with torch.no_grad():  # larger weights than the init: varied greedy paths, so a mismatch would show
        for w in model.parameters():
            if w.dim() == 2:
                w.normal_(0, 0.3)
    used = []
    filled_update = ev._FilledLayer.update
    monkeypatch.setattr(ev._FilledLayer, "update", lambda self, *a, **k: used.append(1) or filled_update(self, *a, **k))
    kw = dict(max_new_tokens=40, temperature=temperature, batch_size=3, seed=7)
    ours = ev.generate(model, tok, PROMPTS, **kw)
    assert used  # the in-place cache was the one generation ran with
    monkeypatch.setattr(ev, "_generation_cache", lambda model, capacity: None)
    assert ours == ev.generate(model, tok, PROMPTS, **kw)
    assert len(set(ours)) > 1 and all(ours)


def test_filled_layer_matches_concatenation_and_grows_past_its_capacity():
    torch.manual_seed(0)
    steps = [torch.randn(2, 3, n, 4) for n in (5, 1, 1, 2)]  # a prompt, then tokens; capacity 8 < 9
    layer, reference = ev._FilledLayer(8), []
    for x in steps:
        k, v = layer.update(x, -x)
        reference.append(x)
        assert torch.equal(k, torch.cat(reference, dim=-2)) and torch.equal(v, -torch.cat(reference, dim=-2))
    assert layer.get_seq_length() == 9


def test_sliding_window_models_keep_transformers_cache(tok):
    from transformers import MistralConfig, MistralForCausalLM

    model = MistralForCausalLM(MistralConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, num_key_value_heads=2, sliding_window=4))
    assert ev._generation_cache(model, 32) is None
    assert ev._generation_cache(_tiny("llama", tok), 32) is not None


def _scripted(tok, scripts):
    """A tiny Llama whose k-th forward call forces row b to emit scripts[b][k] (then EOS forever),
    whatever its input: tests where generation stops without training a model."""
    from transformers import LlamaForCausalLM

    rows = [tok(s, add_special_tokens=False)["input_ids"] for s in scripts]
    S = max(map(len, rows)) + 1
    table = torch.full((len(rows), S), tok.eos_token_id)  # (B, S)
    for b, r in enumerate(rows):
        table[b, :len(r)] = torch.tensor(r)

    class Scripted(LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            step = min(self.calls, S - 1)
            self.calls += 1
            logits = torch.full_like(out.logits, -1e4)
            logits[:, -1].scatter_(1, table[:, step:step + 1].to(logits.device), 0.0)  # one-hot next token
            out.logits = logits
            return out

    model = Scripted(_tiny("llama", tok).config)
    model.calls = 0
    return model


def test_generation_stops_at_eos_or_after_answer_line(tok):
    scripts = [
        "3 + 4 = <<3+4=7>>7\n#### 7\nQuestion: Ava has",   # goes on after its answer line, then EOS
        "12 * 5 = 60\n#### 60",                              # then EOS
        "20 - 8 = 12\nso 12 left\nmore text and more text and more",  # no answer: runs to the limit
    ]
    same_len = [format_prompt("Ava buys pens.")] * 3  # equal lengths: the stable sort keeps row b = prompt b
    want = ["3 + 4 = <<3+4=7>>7\n#### 7", "12 * 5 = 60\n#### 60"]
    n_script = len(tok(scripts[0], add_special_tokens=False)["input_ids"])
    model = _scripted(tok, scripts[:2])
    assert ev.generate(model, tok, same_len[:2], max_new_tokens=64) == want  # cut after the answer line
    assert model.calls == n_script + 1  # the batch stopped once both rows wrote EOS, not at 64 tokens

    n_answer = len(tok(scripts[0].split("#### 7\n")[0] + "#### 7\n", add_special_tokens=False)["input_ids"])
    model = _scripted(tok, scripts[:2])  # stop_at_answer_line: done at the newline after "#### 7" (no EOS needed)
    assert ev.generate(model, tok, same_len[:2], max_new_tokens=64, stop_at_answer_line=True) == want
    assert model.calls <= n_answer + 1 < n_script + 1

    for stop_line in (False, True):
        model = _scripted(tok, scripts)
        limit = n_answer + 5
        assert len(tok(scripts[2], add_special_tokens=False)["input_ids"]) > limit
        out = ev.generate(model, tok, same_len, max_new_tokens=limit, stop_at_answer_line=stop_line)
        assert out[:2] == want  # done rows stay done
        assert scripts[2].startswith(out[2]) and len(tok(out[2], add_special_tokens=False)["input_ids"]) == limit
        assert model.calls == limit


@pytest.fixture(scope="module")
def trained():
    """A tiny Llama trained on solutions that end in "#### N" + EOS (distill.warm_up), fixed for the module."""
    import data
    import distill

    corpus = [format_prompt(p["question"]) + p["answer"] for p in data.generate(300, seed=0, steps=(2, 2), max_value=20)]
    tk = models.build_tokenizer("bpe", corpus, vocab_size=300)
    model = models.build_model("llama", tk, d_model=48, n_layer=2, n_head=2, d_ff=128, seed=0)
    distill.warm_up(model, tk, data.generate(400, seed=1, steps=(2, 2), max_value=20), steps=150, batch_size=32, lr=1e-2)
    return model, tk, [format_prompt(p["question"]) for p in data.generate(24, seed=2, steps=(2, 2), max_value=20)]


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_eos_stopping_gives_the_paths_of_the_answer_line_criterion(trained, temperature):
    model, tk, prompts = trained
    kw = dict(max_new_tokens=120, temperature=temperature, batch_size=8, seed=5)
    eos = ev.generate(model, tk, prompts, **kw)
    line = ev.generate(model, tk, prompts, stop_at_answer_line=True, **kw)
    assert eos == line
    assert sum("####" in y for y in eos) >= len(prompts) // 2  # the model writes answer lines: a real comparison


def test_evaluate_scores_scripted_paths(tok):
    model = _scripted(tok, ["so it is 7\n#### 7\n", "The answer is 60.", "#### 11\n"])
    examples = [{"question": "Ava buys pens.", "answer": f"...\n#### {a}"} for a in ["7", "60", "12"]]
    result = ev.evaluate(model, tok, examples, max_new_tokens=20)
    assert result["n"] == 3
    assert result["completions"] == ["so it is 7\n#### 7", "The answer is 60.", "#### 11"]
    assert result["strict"] == pytest.approx(1 / 3)
    assert result["flexible"] == pytest.approx(2 / 3)
    assert result["checked"] == pytest.approx(1 / 3)  # no annotations to check: strict's

# -----------------------------------------------------------------------------
# CLI


def test_cli_table(tok, tmp_path, capsys):
    models.save_model(_tiny("llama", tok, torch.float32), tok, tmp_path / "m")
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps({"question": f"Ava has {i} apples.", "answer": f"x\n#### {i}"}) + "\n"
                            for i in range(5)))
    assert ev.main(["--model", str(tmp_path / "m"), "--data", f"gsm8k:{data}", "--limit", "3",
                    "--max-new-tokens", "8"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1].split()
    assert last[0] == "3" and 0.0 <= float(last[1]) <= float(last[2]) <= 1.0


@pytest.mark.parametrize("args", [
    ["--model", "/nonexistent/model", "--data", "gsm8k:x.jsonl"],
    ["--model", ".", "--data", "gsm8k:/nonexistent.jsonl"],
    ["--model", ".", "--data", "nonsense"],
    ["--model", ".", "--data", "gsm8k:" + __file__],  # not JSONL
    ["--model", str(REPO / "tests"), "--data", "gsm8k:" + str(GSM8K / "test.jsonl")],  # not a model dir
])
def test_cli_user_errors(args, capsys):
    assert ev.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("eval.py: error: ") and err.count("\n") == 1, err


def test_cli_subprocess_exit_code():
    proc = subprocess.run([sys.executable, str(REPO / "eval.py"), "--model", "/nonexistent", "--data", "gsm8k:x"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.strip().startswith("eval.py: error:")
