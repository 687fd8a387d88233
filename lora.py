"""lora.py: optional LoRA adapters for any party (through peft), and gradient checkpointing.

    python federated.py --llm DIR --slms DIR,DIR,DIR --data gsm8k:PATH --lora 16 --lora_parties llm --grad_ckpt

With `--lora R` a party's base weights are frozen (bf16 on CUDA under the default bf16 autocast,
fp32 elsewhere) and only rank-R adapters on `--lora_targets` train (fp32, AdamW). Without it
nothing here runs and peft need not be installed (it is imported only when --lora is given).

One copy of each model: the party's model *is* the PeftModel (the base model with the adapter
layers injected), and generation, scoring, embeddings and training all run through it. π_ref of
DARD (spec §4) needs no copy either: distill.distill scores y⁺ and y⁻ under the model as
distillation starts, before its first step, and keeps only those log-probs (2 floats per pair) —
the snapshot adapters are never needed again (tests/test_lora.py checks them against a deep copy).
Checkpoints hold the adapters (adapter_model.safetensors) and the optimizer state; the frozen base
is reloaded from where it came from (--llm/--slms, or the warm-up cache).
"""
from pathlib import Path

import torch

from models import ModelError

LORA_FLAGS = dict(  # the federated.py flags of this file (defaults; none changes a run without --lora/--grad_ckpt)
    lora=0, lora_alpha=16.0, lora_dropout=0.0, lora_targets="all-linear", lora_parties="all", grad_ckpt=False,
)
LORA_HELP = {
    "lora": "LoRA rank R for the parties in --lora_parties (0 = full fine-tuning; needs requirements-lora.txt)",
    "lora_alpha": "LoRA scale numerator: the update is (alpha / R) * B @ A",
    "lora_dropout": "dropout on the LoRA branch's input while training",
    "lora_targets": "modules that get adapters: all-linear (every linear layer but the output head) or "
                    "comma-separated module names (q_proj,v_proj)",
    "lora_parties": "which parties get LoRA: all, or comma-separated names (llm,slm1)",
    "grad_ckpt": "gradient checkpointing: keep each layer's input, recompute its activations in backward",
}


def require_peft():
    """The peft module, or a one-line ModelError saying how to install it."""
    try:
        import peft
    except ImportError:
        raise ModelError("--lora needs peft: pip install -r requirements-lora.txt") from None
    return peft


def uses_lora(cfg, name: str) -> bool:
    """Does party `name` train LoRA adapters under this config?"""
    if not cfg.get("lora"):
        return False
    chosen = cfg.get("lora_parties", "all")
    return chosen == "all" or name in chosen.split(",")


def check_parties(cfg, names):
    """ValueError (one line) for LoRA flags that cannot apply to these parties."""
    if not cfg.get("lora"):
        return
    if cfg["lora"] < 0 or not 0.0 <= cfg["lora_dropout"] < 1.0:
        raise ValueError(f"--lora must be >= 0 and --lora_dropout in [0, 1), got {cfg['lora']} and {cfg['lora_dropout']}")
    chosen = cfg.get("lora_parties", "all")
    unknown = [] if chosen == "all" else [n for n in chosen.split(",") if n not in names]
    if unknown:
        raise ValueError(f"--lora_parties {chosen}: no party named {', '.join(unknown)} (parties: {', '.join(names)})")


def base_dtype(cfg, name: str):
    """Dtype to load a party's weights in: bf16 for a LoRA party's frozen base on CUDA under bf16
    autocast (nothing of it trains, so no fp32 master copy), else fp32 (None = the loader's default)."""
    if uses_lora(cfg, name) and cfg["device"].startswith("cuda") and cfg["dtype"] == "bf16":
        return torch.bfloat16
    return None


def is_lora(model) -> bool:
    return hasattr(model, "peft_config")  # a peft.PeftModel


def targets(cfg):
    t = cfg.get("lora_targets", "all-linear")
    return t if t == "all-linear" else [s.strip() for s in t.split(",") if s.strip()]


def add_lora(model, cfg):
    """The model wrapped by peft with fresh rank-cfg['lora'] adapters (B = 0: the wrapped model
    computes exactly what the base does until the first step); base weights frozen."""
    peft = require_peft()
    conf = peft.LoraConfig(r=cfg["lora"], lora_alpha=cfg["lora_alpha"], lora_dropout=cfg["lora_dropout"],
                           target_modules=targets(cfg), bias="none", task_type="CAUSAL_LM")
    try:
        return peft.get_peft_model(model, conf)
    except ValueError as e:  # e.g. a --lora_targets name the model does not have
        raise ValueError(f"--lora_targets {cfg['lora_targets']}: {str(e).splitlines()[0]}") from None


def prepare(model, cfg, name: str):
    """A party's model as the rounds train it: LoRA-wrapped when `uses_lora`, gradient
    checkpointing on when cfg['grad_ckpt']. Returns the (maybe wrapped) model."""
    if uses_lora(cfg, name):
        model = add_lora(model, cfg)
    if cfg.get("grad_ckpt"):  # non-reentrant: works with frozen inputs (no enable_input_require_grads)
        inner = model.get_base_model() if is_lora(model) else model
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def trainable(model) -> list:
    return [p for p in model.parameters() if p.requires_grad]


# -----------------------------------------------------------------------------
# Checkpoints: adapters as safetensors (peft's own layout: adapter_config.json + adapter_model.safetensors)

ADAPTER_FILE = "adapter_model.safetensors"


def save_adapters(model, path):
    model.save_pretrained(str(path), safe_serialization=True)


def load_adapters(model, path):
    """Put the adapters saved in `path` into `model` (a PeftModel of the same config)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    f = Path(path) / ADAPTER_FILE
    if not f.is_file():
        raise ModelError(f"{path}: no {ADAPTER_FILE} (was this checkpoint made without --lora?)")
    dev = next(model.parameters()).device
    res = set_peft_model_state_dict(model, load_file(str(f), device=str(dev)))
    bad = [k for k in res.unexpected_keys if "lora_" in k]
    if bad:
        raise ModelError(f"{path}: adapters do not match this model ({bad[0]})")
