"""models.py: tokenizers, the small model zoo, save/load, warm-up, and the fused-kernel accessor.

Everything is built locally (no hub): tokenizers are trained with the `tokenizers` library on the
generated corpus and saved in the Hugging Face format; models are `transformers` configs with
random initialization (Llama, Qwen2, GPT-2 families). Real checkpoints load from local directories.
"""
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from tqdm.auto import tqdm

SPECIAL = ["<pad>", "<eos>", "<unk>"]

try:  # transformers' own per-shard bars would drown ours
    from transformers.utils import logging as _hf_logging
    _hf_logging.disable_progress_bar()
except ImportError:
    pass


class ModelError(ValueError):
    """A user-facing model problem (e.g. a directory that is not a model)."""


# -----------------------------------------------------------------------------
# Tokenizers

def build_tokenizer(kind: str, corpus: list[str], vocab_size: int | None = None, path=None):
    """A Hugging Face fast tokenizer trained on `corpus`.

    kind 'char': one token per character seen in the corpus (unknown ones -> <unk>).
    kind 'bpe':  byte-level BPE with digits split one per token, `vocab_size` entries.
    Saved to `path` (loadable with AutoTokenizer) when given.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if kind == "char":
        chars = sorted(set("".join(corpus)))
        vocab = {t: i for i, t in enumerate(SPECIAL + chars)}
        tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))  # no merges = characters
        tok.pre_tokenizer = pre_tokenizers.Split("\n", behavior="isolated")  # bound word length
        tok.decoder = decoders.Fuse()
    elif kind == "bpe":
        if not vocab_size:
            raise ValueError("bpe tokenizer needs vocab_size")
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False)])
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(corpus, trainer=trainer)
    else:
        raise ValueError(f"unknown tokenizer kind '{kind}' (char, bpe)")
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    if path is not None:
        hf.save_pretrained(str(path))
    return hf


# -----------------------------------------------------------------------------
# Model zoo: name -> architecture and size. Sizes span > 8x between the default LLM and smallest SLM.

ZOO = {
    # default (GPU) sizes
    "llama-26m": dict(arch="llama", d_model=512, n_layer=8, n_head=8, d_ff=1408),
    "llama-8m": dict(arch="llama", d_model=320, n_layer=6, n_head=5, d_ff=864),
    "qwen2-3m": dict(arch="qwen2", d_model=256, n_layer=4, n_head=4, d_ff=704),
    "gpt2-2m": dict(arch="gpt2", d_model=192, n_layer=4, n_head=4, d_ff=768),
    "llama-1m": dict(arch="llama", d_model=160, n_layer=3, n_head=4, d_ff=432),
    # CPU sizes (reduced; what a 2-core CPU warms up in minutes)
    "llama-cpu-l": dict(arch="llama", d_model=160, n_layer=3, n_head=4, d_ff=432),
    "llama-cpu-m": dict(arch="llama", d_model=112, n_layer=3, n_head=4, d_ff=304),
    "qwen2-cpu-s": dict(arch="qwen2", d_model=80, n_layer=2, n_head=4, d_ff=224),
    "gpt2-cpu-s": dict(arch="gpt2", d_model=64, n_layer=2, n_head=4, d_ff=256),
    "llama-cpu-s": dict(arch="llama", d_model=64, n_layer=2, n_head=4, d_ff=176),
    # test sizes
    "llama-tiny": dict(arch="llama", d_model=32, n_layer=1, n_head=2, d_ff=64),
    "qwen2-tiny": dict(arch="qwen2", d_model=32, n_layer=1, n_head=2, d_ff=64),
    "gpt2-tiny": dict(arch="gpt2", d_model=32, n_layer=1, n_head=2, d_ff=64),
}


def build_model(arch: str, tokenizer, d_model: int, n_layer: int, n_head: int, d_ff: int,
                max_len: int = 1024, seed: int = 0):
    """A randomly initialized causal LM from a transformers config (dropout off)."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config

    common = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                  eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id)
    if arch in ("llama", "qwen2"):
        cls = LlamaConfig if arch == "llama" else Qwen2Config
        cfg = cls(hidden_size=d_model, intermediate_size=d_ff, num_hidden_layers=n_layer,
                  num_attention_heads=n_head, num_key_value_heads=n_head, max_position_embeddings=max_len,
                  tie_word_embeddings=(arch == "qwen2"), **common)
    elif arch == "gpt2":
        cfg = GPT2Config(n_embd=d_model, n_layer=n_layer, n_head=n_head, n_inner=d_ff, n_positions=max_len,
                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common)
    else:
        raise ValueError(f"unknown architecture '{arch}' (llama, qwen2, gpt2)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg)
    return model


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# -----------------------------------------------------------------------------
# Save / load (safetensors; atomic: write to a temp dir, then rename)

def atomic_dir(path):
    """A fresh temporary directory beside `path`; `commit_dir(tmp, path)` moves it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))


def commit_dir(tmp: Path, path):
    """Replace `path` by `tmp` (rename is atomic; the old one is removed after)."""
    path = Path(path)
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_model(model, tokenizer, path):
    """Model (safetensors) + tokenizer in the Hugging Face layout, written atomically."""
    tmp = atomic_dir(path)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    commit_dir(tmp, path)


def load_tokenizer(path):
    """The tokenizer saved in `path`. Our own (class TokenizersBackend/PreTrainedTokenizerFast) load as
    saved: beside a config.json, AutoTokenizer would pick the architecture's tokenizer class
    (e.g. Qwen2Tokenizer, with its own pre-tokenizer) and change the tokenization."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    cfg = Path(path) / "tokenizer_config.json"
    cls = json.loads(cfg.read_text()).get("tokenizer_class") if cfg.is_file() else None
    if cls in ("TokenizersBackend", "PreTrainedTokenizerFast"):
        return PreTrainedTokenizerFast.from_pretrained(str(path))
    return AutoTokenizer.from_pretrained(str(path))


def load_model(path, device="cpu", dtype=None):
    """(model, tokenizer) from a local Hugging Face checkpoint directory; ModelError if it is not one."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ModelError(f"{path}: not a model directory (no config.json)")
    try:
        tokenizer = load_tokenizer(path)
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype or torch.float32)
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"{path}: cannot load model ({str(e).splitlines()[0]})") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device), tokenizer


# -----------------------------------------------------------------------------
# The fused-kernel accessor (spec §5)

def hidden_and_head(model, input_ids, attention_mask):
    """Final hidden states after the final norm (B, T, d) and the output head weight (V, d)."""
    out = model.base_model(input_ids=input_ids, attention_mask=attention_mask)
    return out.last_hidden_state, model.get_output_embeddings().weight


# -----------------------------------------------------------------------------
# Warm-up: SFT of a party on its own data, cached by a hash of everything that determines it

def fingerprint(*objs) -> str:
    return hashlib.sha256(json.dumps(objs, sort_keys=True, default=str).encode()).hexdigest()[:16]


def warm_up(model, tokenizer, examples, steps: int, batch_size: int = 32, lr: float = 3e-3,
            seed: int = 0, device="cpu", desc="warm-up", max_len: int = 512):
    """`steps` AdamW steps of SFT on (question, gold solution) pairs; returns the mean loss of the last 20."""
    import random
    import sys
    import time

    from distill import local_batch_loss, optimizer_step

    rng = random.Random(seed)
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, min(50, steps // 10))) * max(0.1, 1 - s / steps))
    losses, t0, tty = [], time.time(), sys.stderr.isatty()
    for step in (bar := tqdm(range(steps), desc=desc, leave=False, disable=None)):  # a bar on a terminal ...
        loss = local_batch_loss(model, tokenizer, examples, batch_size, rng, device, max_len)
        optimizer_step(model, opt, loss)
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if not tty and (step + 1) % max(1, steps // 10) == 0:  # ... and a line per tenth off one (logs, pipes)
            print(f"{desc}: step {step + 1}/{steps}, loss {loss.item():.3f}, {time.time() - t0:.0f} s", flush=True)
    model.eval()
    return sum(losses[-20:]) / max(1, len(losses[-20:]))


def build_party(name: str, zoo_name: str, tok_spec: tuple, corpus: list[str], warm_data: list[dict],
                warm: dict, cache_dir, device="cpu", seed: int = 0, max_len: int = 1024):
    """Build (tokenizer, model) for one party and warm it up, or load it from the cache.

    tok_spec: ("char",) or ("bpe", vocab_size). warm: dict(steps, batch_size, lr).
    Returns (model, tokenizer, info) with info = dict(params, warm_seconds, warm_loss, cached).
    """
    import time

    key = fingerprint(name, zoo_name, ZOO[zoo_name], tok_spec, warm, seed, max_len,
                      fingerprint([e["question"] + e["answer"] for e in warm_data]), fingerprint(corpus[:2000]))
    path = Path(cache_dir) / f"{name}-{key}"
    if (path / "info.json").is_file():
        model, tok = load_model(path, device=device)
        return model, tok, dict(json.loads((path / "info.json").read_text()), cached=True)
    tok = build_tokenizer(tok_spec[0], corpus, *tok_spec[1:])
    model = build_model(tokenizer=tok, max_len=max_len, seed=seed, **ZOO[zoo_name])
    t0 = time.time()
    loss = warm_up(model, tok, warm_data, seed=seed, device=device, desc=f"warm-up {name}", **warm)
    info = dict(params=n_params(model), warm_seconds=round(time.time() - t0, 1), warm_loss=loss, zoo=zoo_name,
                tokenizer=list(tok_spec), vocab=len(tok))
    save_model(model, tok, path)
    (path / "info.json").write_text(json.dumps(info))
    return model, tok, dict(info, cached=False)


@torch.no_grad()
def mean_hidden(model, tokenizer, texts, batch_size=64, device="cpu"):
    """Mean-pooled final hidden state of each text (n, d): the sample embedding of spec §3.1."""
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i:i + batch_size], add_special_tokens=False, padding=True, return_tensors="pt")
        ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
        h, _ = hidden_and_head(model, ids, mask)  # (B, T, d)
        m = mask.unsqueeze(-1).to(h.dtype)
        out.append(((h * m).sum(1) / m.sum(1).clamp_min(1)).float().cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, model.config.hidden_size)
