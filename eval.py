"""eval.py: generate reasoning paths and measure a model's accuracy.

A reasoning path is what a model writes after `data.format_prompt(question)`: steps one per line
with `<<a*b=c>>` calculator annotations, last line `#### N`, then EOS (LADA_SPEC.md §1). The grader
used everywhere in the project (correctness of y_L / y_k, test accuracy) is answers.py
(`extract_answer`, `is_correct`, the modes strict / flexible / checked); here:

    generate(model, tok, prompts) batched KV-cache decoding that stops after the "#### N" line
    evaluate(model, tok, examples) -> {"strict", "flexible", "checked", "n", "completions", "correct"}

CLI (a held-out GSM8K-format file and a model directory saved by models.py):

    python eval.py --model runs/llm --data gsm8k:../shared/data/gsm8k/test.jsonl --limit 200
"""

import argparse
import sys
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.cache_utils import DynamicCache, DynamicLayer

from answers import ANSWER_LINE_RE, MODES, is_correct
from data import format_prompt, load_dataset
from models import load_model, to_device

# -----------------------------------------------------------------------------
# Generation


def _cut_after_answer(text: str) -> str:
    """Keep a path up to the end of its first "####" line (the newline itself is dropped, so the
    path ends in "#### N" as in training). Text without a finished "####" line is kept whole."""
    m = ANSWER_LINE_RE.search(text)
    return text[: m.end() - 1] if m else text


class _StopAfterAnswer(StoppingCriteria):
    """Per row: done once the generated text holds a finished "#### N" line. For models that do not
    end a path with EOS (checkpoints trained elsewhere); it decodes a row's text whenever its newest
    token holds a newline, a host sync per token, so models trained here stop on EOS instead."""

    def __init__(self, tokenizer, prompt_len: int):
        self.tokenizer = tokenizer
        self.prompt_len = prompt_len  # columns before this are the (left-padded) prompt
        self.done = None

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        if self.done is None:
            self.done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        last = self.tokenizer.batch_decode(input_ids[:, -1:].tolist())
        for row, piece in enumerate(last):
            if not self.done[row] and "\n" in piece:
                text = self.tokenizer.decode(input_ids[row, self.prompt_len:].tolist(), skip_special_tokens=True)
                self.done[row] = ANSWER_LINE_RE.search(text) is not None
        return self.done.clone()


class _FilledLayer(DynamicLayer):
    """A KV-cache layer that holds a buffer for the whole generation (prompt + max_new_tokens) and
    writes each step's keys and values in place. transformers' DynamicLayer concatenates the cache
    to every new token, which copies it once per token per layer: on the testbed's CPU that was 62% of
    a character-level SLM's sampling time. Attention still sees exactly the filled prefix (a view of
    the buffer), so the paths are the same token for token (tests/test_eval.py)."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity

    def lazy_initialization(self, keys, values):
        super().lazy_initialization(keys, values)
        B, H, _, D = keys.shape
        self.key_buf = keys.new_empty(B, H, self.capacity, D)
        self.value_buf = values.new_empty(B, H, self.capacity, values.shape[-1])
        self.keys, self.values = self.key_buf[:, :, :0], self.value_buf[:, :, :0]

    def update(self, keys, values, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(keys, values)
        n, m = self.keys.shape[-2], keys.shape[-2]
        if n + m > self.capacity or keys.shape[0] != self.key_buf.shape[0]:  # not planned for: grow as transformers does
            return super().update(keys, values)
        self.key_buf[:, :, n:n + m] = keys
        self.value_buf[:, :, n:n + m] = values
        self.keys, self.values = self.key_buf[:, :, :n + m], self.value_buf[:, :, :n + m]
        return self.keys, self.values


def _generation_cache(model, capacity: int):
    """A cache of _FilledLayer for models whose every layer would get a plain DynamicLayer (full
    attention); None (transformers' default cache) for any other layout, e.g. sliding windows."""
    try:
        default = DynamicCache(config=model.config)
    except Exception:  # a config transformers cannot read layer types from: keep its default
        return None
    if any(type(layer) is not DynamicLayer for layer in default.layers):
        return None
    cache = DynamicCache()  # layers made lazily, one per model layer, as transformers' own does
    cache.layer_class_to_replicate = lambda: _FilledLayer(capacity)
    return cache


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 256, temperature: float = 0.0,
             batch_size: int = 512, seed: int | None = None, device=None, stop_at_answer_line: bool = False) -> list[str]:
    """One reasoning path per prompt (the generated text only, cut after its "#### N" line), in the
    order of `prompts`. A row stops at EOS (paths end with EOS, spec §1); `stop_at_answer_line` also
    stops it after a finished "#### N" line, for models that do not write EOS. Greedy when
    temperature == 0, else plain temperature sampling (no top-k/p), seeded by `seed` without touching
    the global RNG; with a seed the result also depends on batch_size, since prompts are batched by
    length. Prompt ids are tokenizer(prompt, add_special_tokens=False), exactly the ids training
    puts in front of a path, all tokenized in one call."""
    if not prompts:
        return []
    device = torch.device(device) if device is not None else next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("tokenizer has neither a pad nor an eos token")
    ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    if any(len(x) == 0 for x in ids):
        raise ValueError("a prompt tokenizes to no tokens; nothing to condition on")
    order = sorted(range(len(prompts)), key=lambda i: -len(ids[i]))  # longest first: similar lengths share a batch
    if temperature > 0:  # top_k=0, top_p=1: pure temperature sampling, whatever the model's generation_config says
        sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
    else:
        sampling = dict(do_sample=False)
    out = [None] * len(prompts)
    was_training = model.training
    model.eval()
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.inference_mode(), torch.random.fork_rng(devices=devices, enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            starts = range(0, len(order), batch_size)
            for start in tqdm(starts, desc="generate", leave=False, disable=True if len(starts) <= 1 else None):
                rows = order[start:start + batch_size]
                T = max(len(ids[i]) for i in rows)
                input_ids = torch.tensor([[pad_id] * (T - len(ids[i])) + ids[i] for i in rows])  # (B, T), left padded
                attention_mask = torch.tensor([[0] * (T - len(ids[i])) + [1] * len(ids[i]) for i in rows])
                stop = StoppingCriteriaList([_StopAfterAnswer(tokenizer, T)]) if stop_at_answer_line else None
                gen = model.generate(
                    input_ids=to_device(input_ids, device), attention_mask=to_device(attention_mask, device),
                    max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id,
                    stopping_criteria=stop, use_cache=True, cache=_generation_cache(model, T + max_new_tokens),
                    **sampling)  # (B, T + new)
                texts = tokenizer.batch_decode(gen[:, T:].tolist(), skip_special_tokens=True,
                                               clean_up_tokenization_spaces=False)
                for i, text in zip(rows, texts):
                    out[i] = _cut_after_answer(text)
    finally:
        model.train(was_training)
    return out

# -----------------------------------------------------------------------------
# Evaluation


def evaluate(model, tokenizer, examples: list[dict], batch_size: int = 512, max_new_tokens: int = 256,
             device=None, stop_at_answer_line: bool = False) -> dict:
    """Greedy accuracy on examples [{"question", "answer" (GSM8K answer field)}]; n == 0 gives NaN.
    Returns {"n", "completions", "correct": {mode: [bool per example]}, and each mode's accuracy}."""
    prompts = [format_prompt(ex["question"]) for ex in examples]
    completions = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=0.0,
                           batch_size=batch_size, device=device, stop_at_answer_line=stop_at_answer_line)
    n = len(examples)
    result = {"n": n, "completions": completions, "correct": {}}
    for mode in MODES:
        result["correct"][mode] = [is_correct(c, ex["answer"], mode) for c, ex in zip(completions, examples)]
        result[mode] = sum(result["correct"][mode]) / n if n else float("nan")
    return result


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        print(f"eval.py: error: {message}", file=sys.stderr)
        sys.exit(2)


def main(argv=None) -> int:
    parser = _Parser(description="GSM8K accuracy of a saved model (greedy decoding)")
    # what to evaluate
    parser.add_argument("--model", required=True, help="model directory (as saved by models.py)")
    parser.add_argument("--data", required=True, help="dataset spec, e.g. gsm8k:PATH.jsonl")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N examples")
    # decoding
    parser.add_argument("--batch-size", type=int, default=64, help="prompts per generate() call")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="tokens per path, at most")
    parser.add_argument("--device", default=None, help="cpu | cuda | cuda:1 (default: cuda if available)")
    parser.add_argument("--stop-at-answer-line", action="store_true",
                        help="also stop a path after its '#### N' line (for models that do not write EOS)")
    args = parser.parse_args(argv)
    print(vars(args))

    def fail(msg: str) -> int:
        print(f"eval.py: error: {msg}", file=sys.stderr)
        return 2

    for flag, value in [("--limit", args.limit), ("--batch-size", args.batch_size),
                        ("--max-new-tokens", args.max_new_tokens)]:
        if value is not None and value < 1:
            return fail(f"{flag} must be >= 1, got {value}")
    if not Path(args.model).is_dir():
        return fail(f"model directory not found: {args.model}")
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        return fail(f"unknown device {args.device!r}")
    if device.type not in ("cpu", "cuda"):
        return fail(f"--device must be cpu, cuda or cuda:N, got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        return fail(f"device {args.device!r} requested but CUDA is not available")
    try:  # the loaders raise these for user errors (bad spec, missing or unreadable files)
        examples = load_dataset(args.data)[: args.limit]
        model, tokenizer = load_model(args.model)
    except (ValueError, FileNotFoundError, OSError) as e:
        return fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    model.to(device)
    result = evaluate(model, tokenizer, examples, batch_size=args.batch_size,
                      max_new_tokens=args.max_new_tokens, device=device, stop_at_answer_line=args.stop_at_answer_line)
    print(f"{'n':>6} {'strict':>8} {'flexible':>9} {'checked':>8}")
    print(f"{result['n']:>6} {result['strict']:>8.4f} {result['flexible']:>9.4f} {result['checked']:>8.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
