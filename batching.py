"""batching.py: token ids and batches. Every text is tokenized once; batches are collated from the
cached ids, right-padded, with labels shifted and the prompt masked (spec §1: log p(y|x) sums the
path's tokens only), and the unmasked positions found on the host for the fused head (kernels/).
"""
import random

import torch

from data import format_prompt
from kernels import kept_tokens, mask_imitation_rows
from models import to_device

IGNORE = -100


def encode(tokenizer, questions, paths) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, path ids + EOS) per row. Prompt and path are tokenized apart (no merges across
    the boundary), in one batched tokenizer call each; EOS ends every path (spec §1), so a model
    trained here stops generating by itself."""
    if not questions:  # a tokenizer refuses an empty batch
        return []
    prompts = tokenizer([format_prompt(q) for q in questions], add_special_tokens=False).input_ids
    answers = tokenizer(list(paths), add_special_tokens=False).input_ids
    eos = tokenizer.eos_token_id
    return [(p, a + [eos]) for p, a in zip(prompts, answers)]


def collate(rows, pad_id, device=None) -> dict:
    """A right-padded batch of encoded rows (`encode`), never cut: a row that must not exceed a
    length is left out before it gets here (TokenizedSet, distill), and counted.

    Returns input_ids (B, T), labels (B, T) already shifted (labels[t] is the token after input t;
    prompt positions and padding are -100), n_tokens (B,) = path tokens + EOS, the |y| of spec §4,
    and tok, the flat indices of the labelled positions (kernels.kept_tokens), found here on the host
    so that the head never waits for the device to find them.
    No attention mask: with right padding no real position of a causal model attends to a pad, so
    the model runs its unmasked (flash) attention; labels keep the pads out of every loss.
    """
    seqs = []
    for p, a in rows:
        ids, lab = p + a, ([IGNORE] * len(p) + a)[1:] + [IGNORE]  # shifted: position t predicts token t+1
        seqs.append((ids, lab))
    T = max(len(ids) for ids, _ in seqs)
    input_ids = torch.tensor([ids + [pad_id] * (T - len(ids)) for ids, _ in seqs])
    labels = torch.tensor([lab + [IGNORE] * (T - len(lab)) for _, lab in seqs])
    enc = dict(input_ids=input_ids, labels=labels, n_tokens=(labels != IGNORE).sum(1), tok=kept_tokens(labels, IGNORE))
    return {k: to_device(v, device) for k, v in enc.items()}


def encode_pairs(tokenizer, questions, paths, device=None) -> dict:
    """`collate(encode(...))`: one batch straight from texts."""
    return collate(encode(tokenizer, questions, paths), tokenizer.pad_token_id, device)


class TokenizedSet:
    """A party's (question, solution) examples, tokenized once, served as length-bucketed batches.
    Examples longer than `max_len` tokens (prompt + solution + EOS) are left out, never cut; `dropped`
    counts them, and with a `name` one line says so."""

    def __init__(self, tokenizer, examples, max_len=None, name=None):
        rows = encode(tokenizer, [e["question"] for e in examples], [e["answer"] for e in examples])
        self.rows = [r for r in rows if max_len is None or len(r[0]) + len(r[1]) <= max_len]
        self.dropped, self.pad_id = len(rows) - len(self.rows), tokenizer.pad_token_id
        self.lengths = [len(p) + len(a) for p, a in self.rows]
        if self.dropped and name:
            print(f"{name}: {self.dropped} of {len(rows)} examples are longer than --max_len {max_len} tokens "
                  "and are left out", flush=True)

    def __len__(self):
        return len(self.rows)

    def batch(self, idx, device=None) -> dict:
        return collate([self.rows[i] for i in idx], self.pad_id, device)

    def batches(self, batch_size, rng: random.Random, group=16):
        """Endless batches of `batch_size` row indices (all rows if fewer): a stream of random
        permutations is cut into groups of `group` batches; each group is sorted by length and split,
        and its batches come out in random order. Every row once per pass, little padding."""
        bs = min(batch_size, len(self.rows))
        if bs == 0:
            return
        stream = []
        while True:
            while len(stream) < bs * group:
                perm = list(range(len(self.rows)))
                rng.shuffle(perm)
                stream += perm
            chunk, stream = sorted(stream[:bs * group], key=self.lengths.__getitem__), stream[bs * group:]
            batches = [chunk[i:i + bs] for i in range(0, len(chunk), bs)]
            rng.shuffle(batches)
            yield from batches


def as_tokenized(data, tokenizer, max_len=None) -> TokenizedSet:
    return data if isinstance(data, TokenizedSet) else TokenizedSet(tokenizer, data, max_len)


def collate_pairs(pos, neg, w, pad_id, device=None) -> dict:
    """A batch of pairs in Liger's layout (rows 0..B-1 the y+ rows, B..2B-1 the y- rows) whose y- rows of
    imitation-only pairs (w = 0) are masked out on the host, so the head skips them (spec §4')."""
    enc = collate(pos + neg, pad_id)
    if not all(w):
        labels = mask_imitation_rows(enc["labels"], torch.tensor(w), IGNORE)
        enc.update(labels=labels, n_tokens=(labels != IGNORE).sum(1), tok=kept_tokens(labels, IGNORE))
    return {k: to_device(v, device) for k, v in enc.items()}
