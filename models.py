"""models.py: tokenizers, the small model zoo, save/load of models, the warm-up cache, and the fused-kernel accessor.

Everything is built locally (no hub): tokenizers are trained with the `tokenizers` library on the
generated corpus and saved in the Hugging Face format; models are `transformers` configs with
random initialization (Llama, Qwen2, GPT-2 families). Real checkpoints load from local directories.
"""
import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
from tokenizers import models as tokenizer_models
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, GPT2Config, LlamaConfig,
                          PreTrainedTokenizerFast, Qwen2Config)

from store import MANIFEST, StateError, atomic_dir, check_manifest, commit_dir, crash_point

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
    if kind == "char":
        chars = sorted(set("".join(corpus)))
        vocab = {t: i for i, t in enumerate(SPECIAL + chars)}
        tok = Tokenizer(tokenizer_models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))  # no merges = characters
        tok.pre_tokenizer = pre_tokenizers.Split("\n", behavior="isolated")  # bound word length
        tok.decoder = decoders.Fuse()
    elif kind == "bpe":
        if not vocab_size:
            raise ValueError("bpe tokenizer needs vocab_size")
        tok = Tokenizer(tokenizer_models.BPE())
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
    # the testbed's SLMs (docs/study.md, "The testbed"): from a pretrained start (--slm_pretrain), 500 more solved
    # problems lift them by 3.5-10.5 points (checked grading; results/testbed/probes/), small enough for a CPU
    "qwen2-tb": dict(arch="qwen2", d_model=128, n_layer=3, n_head=4, d_ff=352),
    "gpt2-tb": dict(arch="gpt2", d_model=128, n_layer=3, n_head=4, d_ff=352),
    "llama-tb": dict(arch="llama", d_model=128, n_layer=3, n_head=4, d_ff=352),
    # test sizes
    "llama-tiny": dict(arch="llama", d_model=32, n_layer=1, n_head=2, d_ff=64),
    "qwen2-tiny": dict(arch="qwen2", d_model=32, n_layer=1, n_head=2, d_ff=64),
    "gpt2-tiny": dict(arch="gpt2", d_model=32, n_layer=1, n_head=2, d_ff=64),
}


def build_model(arch: str, tokenizer, d_model: int, n_layer: int, n_head: int, d_ff: int,
                max_len: int = 1024, seed: int = 0):
    """A randomly initialized causal LM from a transformers config (dropout off)."""
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
    return skip_padding_check(model)


def skip_padding_check(model):
    """Right-padded batches go in without an attention mask on purpose (a causal model's real
    positions never see the pads; no mask keeps the fast attention paths open). GPT-2's forward checks
    for pads without a mask on every call: on CUDA that reads the batch back to the host, and it
    prints a warning that does not apply here. The check is switched off for this model."""
    for m in model.modules():
        if hasattr(m, "warn_if_padding_and_no_attention_mask"):
            m.warn_if_padding_and_no_attention_mask = lambda input_ids, attention_mask: None
    return model


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# -----------------------------------------------------------------------------
# Save / load of models (directories put in place by store.commit_dir)

def save_model(model, tokenizer, path, info: dict | None = None):
    """Model (safetensors) + tokenizer in the Hugging Face layout (+ info.json when given), written
    atomically: everything lands in one rename."""
    tmp = atomic_dir(path)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    crash_point("save_model")  # weights written, info.json not yet
    if info is not None:
        (tmp / "info.json").write_text(json.dumps(info))
    commit_dir(tmp, path)


def load_tokenizer(path):
    """The tokenizer saved in `path`. Our own (class TokenizersBackend/PreTrainedTokenizerFast) load as
    saved: beside a config.json, AutoTokenizer would pick the architecture's tokenizer class
    (e.g. Qwen2Tokenizer, with its own pre-tokenizer) and change the tokenization."""
    cfg = Path(path) / "tokenizer_config.json"
    cls = json.loads(cfg.read_text()).get("tokenizer_class") if cfg.is_file() else None
    if cls in ("TokenizersBackend", "PreTrainedTokenizerFast"):
        return PreTrainedTokenizerFast.from_pretrained(str(path))
    return AutoTokenizer.from_pretrained(str(path))


CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")  # transformers' class names of decoder-only causal LMs


def check_causal_lm(config, path):
    """ModelError unless `config` describes a decoder-only causal LM: its `architectures`, when
    given, name a *ForCausalLM / *LMHeadModel class, and it is not an encoder-decoder."""
    arch = getattr(config, "architectures", None) or []
    if getattr(config, "is_encoder_decoder", False) or (arch and not any(a.endswith(CAUSAL_SUFFIXES) for a in arch)):
        raise ModelError(f"{path}: not a causal language model (config.json: architectures "
                         f"{', '.join(arch) or '?'}, model_type {getattr(config, 'model_type', '?')})")


def check_tokenizer(tokenizer, model, path):
    """ModelError unless the tokenizer has what the loop needs: an EOS token (every path ends with
    it, spec §1; it also pads when there is no pad token) and ids the model's embedding covers."""
    if tokenizer.eos_token_id is None:
        raise ModelError(f"{path}: the tokenizer has no EOS token (paths end with EOS, spec §1); "
                         "set eos_token in its tokenizer_config.json")
    V = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > V:
        raise ModelError(f"{path}: the tokenizer has {len(tokenizer)} tokens but the model's embedding only {V}")


def load_model(path, device="cpu", dtype=None):
    """(model, tokenizer) from a local Hugging Face checkpoint directory; ModelError if it is not a
    causal LM with a usable tokenizer. Only safetensors weights are read (pickled ones such as
    pytorch_model.bin can run code when loaded: they are refused), and no code from the directory is
    run (no trust_remote_code)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ModelError(f"{path}: not a model directory (no config.json)")
    if not any((path / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json")):
        pickled = [f.name for f in path.glob("*.bin")] + [f.name for f in path.glob("*.pt")] + [f.name for f in path.glob("*.pth")]
        raise ModelError(f"{path}: no model.safetensors" + (f" ({pickled[0]} is a pickle, which can run code when loaded: "
                                                            "convert it to safetensors first)" if pickled else ""))
    try:
        json.loads((path / "config.json").read_text(encoding="utf-8"))
        check_causal_lm(AutoConfig.from_pretrained(str(path)), path)
        tokenizer = load_tokenizer(path)
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype or torch.float32, use_safetensors=True,
                                                     trust_remote_code=False)
    except ModelError:
        raise
    except Exception as e:  # anything the libraries raise on a damaged or foreign directory: one line
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ModelError(f"{path}: cannot load model ({msg})") from None
    check_tokenizer(tokenizer, model, path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token_id is None:
        raise ModelError(f"{path}: the tokenizer has no end-of-sequence token")
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise ModelError(f"{path}: the tokenizer has {len(tokenizer)} tokens but the model's embedding only {rows} rows")
    return skip_padding_check(model).to(device), tokenizer


# -----------------------------------------------------------------------------
# The fused-kernel accessor (spec §5)

def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """Host tensor -> device: pinned and non-blocking on CUDA, so the copy overlaps queued work."""
    if device is None or torch.device(device).type == "cpu":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def hidden_and_head(model, input_ids, attention_mask=None):
    """Final hidden states after the final norm (B, T, d) and the output head weight (V, d) (frozen,
    requires_grad False, for a LoRA party: the kernels then compute no weight gradient). Right-padded batches need no attention_mask (a causal model's real positions never see the pads)."""
    inner = model.get_base_model() if hasattr(model, "peft_config") else model  # a LoRA party's PeftModel
    out = inner.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state, inner.get_output_embeddings().weight


# -----------------------------------------------------------------------------
# The warm-up cache: a party's warmed-up model stored by a hash of everything that determines it
# (the training itself is distill.warm_up)

WARM_UP_VERSION = 2  # bumped when distill.warm_up changes what it computes (2: length-bucketed batches)


def fingerprint(*objs) -> str:
    return hashlib.sha256(json.dumps(objs, sort_keys=True, default=str).encode()).hexdigest()[:16]


def party_cache_dir(cache_dir, name: str, zoo_name: str, tok_spec: tuple, corpus: list[str], warm_data: list[dict],
                    warm: dict, seed: int = 0, max_len: int = 1024) -> Path:
    """Where the warmed-up party lives in the cache (a hash of zoo entry, tokenizer, data, warm-up, seed)."""
    key = fingerprint(WARM_UP_VERSION, name, zoo_name, ZOO[zoo_name], tok_spec, warm, seed, max_len,
                      fingerprint([e["question"] + e["answer"] for e in warm_data]), fingerprint(corpus[:2000]))
    return Path(cache_dir) / f"{name}-{key}"


def lock_entry(path, block=False):
    """The exclusive lock of a cache entry (the hidden file .NAME.lock beside it: the cache's visible
    names are whole entries only), so that processes sharing a cache warm each party up once: an open
    file holding the lock; without `block`, None while another process holds it. Closing the file (or
    the process ending, however it ends) releases it. Without fcntl (not POSIX) every try succeeds:
    no lock, and the entries are still written atomically."""
    try:
        import fcntl
    except ImportError:
        return open(os.devnull, "w")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path.with_name(f".{path.name}.lock"), "a")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | (0 if block else fcntl.LOCK_NB))
        return f
    except BlockingIOError:
        f.close()
        return None


def load_cached_party(path, device="cpu"):
    """(model, tokenizer, info) from a finished cache entry, or None. An entry counts as finished only
    once info.json is in it (`save_model(..., info=...)` commits it with the model in one rename), so a
    half-written entry is never loaded."""
    path = Path(path)
    if not (path / "info.json").is_file():
        return None
    try:
        info = json.loads((path / "info.json").read_text(encoding="utf-8"))
        if not isinstance(info, dict):
            raise ValueError("not an object")
        model, tok = load_model(path, device=device)
    except ValueError as e:  # damaged or tampered with: say which entry, do not overwrite it silently
        raise ModelError(f"{str(e) if isinstance(e, ModelError) else f'{path}/info.json: {e}'}; "
                         "delete this cache entry to rebuild it") from None
    return model, tok, dict(info, cached=True)


# Shipped bases: warm-up cache entries made by `python bases/make.py` with the project's own warm-up and
# committed (the CPU preset's hetero parties, seed 0), so that a first run starts from warmed-up models as
# real users start from pretrained checkpoints. A base is used only where its name (party and key) is the
# cache entry a run computes: a change to the preset, the data or the warm-up gives another key, and a warm-up.
BASES = Path(__file__).resolve().parent / "bases"


def check_base(base: Path):
    """ModelError unless every file of the base is there with the SHA-256 its manifest.json lists
    (store.check_manifest, the manifest required)."""
    try:
        check_manifest(base, required=True)
    except StateError as e:
        raise ModelError(f"{e}; run `python bases/make.py` again, or --rewarm") from None


def copy_base(path) -> Path | None:
    """Put the shipped base of the cache entry `path` into the cache (checked against its manifest; its
    info.json then names the base, so --rewarm knows the entry for a copy). None where none is shipped."""
    base = BASES / Path(path).name
    if not (base / "info.json").is_file():
        return None
    check_base(base)
    tmp = atomic_dir(path)
    shutil.copytree(base, tmp, dirs_exist_ok=True)
    (tmp / MANIFEST).unlink()
    info = json.loads((tmp / "info.json").read_text(encoding="utf-8"))
    (tmp / "info.json").write_text(json.dumps(dict(info, base=base.name)))
    commit_dir(tmp, path)
    return base


def new_party(zoo_name: str, tok_spec: tuple, corpus: list[str], seed: int = 0, max_len: int = 1024):
    """(model, tokenizer) before warm-up: a tokenizer trained on `corpus` (tok_spec ("char",) or
    ("bpe", vocab_size)) and a randomly initialized model of the zoo entry."""
    tok = build_tokenizer(tok_spec[0], corpus, *tok_spec[1:])
    return build_model(tokenizer=tok, max_len=max_len, seed=seed, **ZOO[zoo_name]), tok


@torch.no_grad()
def mean_hidden(model, tokenizer, texts, batch_size=256, device="cpu"):
    """Mean-pooled final hidden state of each text (n, d): the sample embedding of spec §3.1.
    Texts are tokenized in one call and right-padded by hand (whatever the tokenizer's padding side)."""
    was_training = model.training
    model.eval()
    ids = tokenizer(list(texts), add_special_tokens=False).input_ids
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = []
    for i in range(0, len(ids), batch_size):
        rows = ids[i:i + batch_size]
        T = max(len(r) for r in rows)
        x = torch.tensor([r + [pad] * (T - len(r)) for r in rows])
        m = torch.tensor([[1.0] * len(r) + [0.0] * (T - len(r)) for r in rows])
        h, _ = hidden_and_head(model, to_device(x, device))  # (B, T, d)
        m = to_device(m, device).unsqueeze(-1)
        out.append(((h.float() * m).sum(1) / m.sum(1).clamp_min(1)))
    model.train(was_training)
    return torch.cat(out).cpu() if out else torch.zeros(0, model.config.hidden_size)
