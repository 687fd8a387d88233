"""memory.py: the memory plan of a run, printed before it starts, and the check that it fits.

Every party's model lives on the one device for the whole run, so the plan is

    total = Σ_parties (weights + gradients + optimizer state) + max_parties max(training activations, generation)

(gradients stay allocated between steps: optimizer_step frees them only at the next zero_grad;
only one party computes at a time, so only the largest transient counts). Figures per party:

  weights      every parameter at its dtype: fp32 (fp32 master weights under bf16 autocast), or
               for a LoRA party on CUDA a bf16 frozen base plus fp32 adapters
  trainable    parameters the optimizer updates: all, or the adapters (r·(d_in + d_out) per adapted linear)
  gradients    trainable × 4 bytes (fp32)
  optimizer    AdamW: exp_avg and exp_avg_sq (trainable × 8 bytes) and one fp32 step per tensor
  activations  tensors saved for backward by the largest training step, rows × --max_len tokens: a
               DARD step's 2·distill_batch paths plus local_batch local rows when λ > 0, a local
               step's local_batch rows, a warm-up's warm_batch; per layer and token from what the
               transformers Llama/Qwen2 and GPT-2 layers save (counted with saved-tensor hooks on
               CPU: tests/test_lora.py checks the fp32 figures within ACT_TOLERANCE), plus the head
               (CPU: one chunk of fp32 logits; CUDA: the fused kernel's O(tokens) state). With
               --grad_ckpt: each layer's input, plus one layer recomputed. The bf16-autocast figures
               of CUDA follow the same count at 2 bytes per element (norm statistics fp32, one bf16
               copy of a linear's input per fp32-weight linear that reads it, LoRA's A included, as
               peft casts its input to the adapter's fp32): computed, not measured.
  generation   the KV cache of eval_batch rows × --max_len positions, plus a step's logits (fp32)

`plan(cfg, models)` takes models on any device, the meta device included (`meta_model` builds one
from a checkpoint's config.json without reading its weights), so the check runs before a 7B
checkpoint is loaded.
"""
import os
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

import config
from lora import check_parties, targets, uses_lora
from models import ModelError, check_causal_lm

GB = 1e9
ACT_TOLERANCE = 0.10  # plan vs saved-tensor bytes measured on CPU (fp32), relative
HEADROOM = 0.9  # the plan must fit in this fraction of the free memory (allocator fragmentation, CUDA context)
CHUNK_LOGITS = 2**26  # kernels.seq_logprob_reference's chunk: logits held at once on the CPU path


class PlanError(ValueError):
    """The plan does not fit the device (one line, naming what to change)."""


def meta_model(path):
    """The causal LM of checkpoint `path` on the meta device (config.json only, no weights read);
    ModelError if `path` is not a causal LM checkpoint."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ModelError(f"{path}: not a model directory (no config.json)")
    try:
        config = AutoConfig.from_pretrained(str(path))
        check_causal_lm(config, path)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError, KeyError) as e:
        if isinstance(e, ModelError):
            raise
        raise ModelError(f"{path}: cannot build a causal LM from its config.json ({str(e).splitlines()[0]})") from None


def _linears(model):
    """[(module name, d_in, d_out)] of every linear layer (nn.Linear, GPT-2's Conv1D) but the output head."""
    head = model.get_output_embeddings()
    out = []
    for name, mod in model.named_modules():
        if mod is head:
            continue
        if isinstance(mod, torch.nn.Linear):
            out.append((name, mod.in_features, mod.out_features))
        elif isinstance(mod, Conv1D):
            out.append((name, mod.weight.shape[0], mod.weight.shape[1]))
    return out


def _adapted(name, tgt):
    return tgt == "all-linear" or any(name == t or name.endswith("." + t) for t in tgt)


def shape(model) -> dict:
    """The sizes the activation count needs, from the model's config."""
    c = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if c.model_type == "gpt2":
        d, H = c.n_embd, c.n_head
        return dict(kind="gpt2", L=c.n_layer, d=d, H=H, dkv=d, ff=c.n_inner or 4 * d, V=c.vocab_size)
    d, H = c.hidden_size, c.num_attention_heads
    hd = getattr(c, "head_dim", None) or d // H
    return dict(kind="llama", L=c.num_hidden_layers, d=d, H=H, dq=H * hd, dkv=(getattr(c, "num_key_value_heads", None)
                or H) * hd, ff=c.intermediate_size, V=c.vocab_size)


# -----------------------------------------------------------------------------
# Activations saved for backward (per token), counted from the transformers layers:
# Llama/Qwen2 layer, fp32: RMSNorm keeps its input x, rsqrt (1) and x·rsqrt (the product with a
# trainable weight), the normed output once (the q/k/v or gate/up linears' input); sdpa keeps q, k,
# v, its output and a log-sum-exp per head; o_proj its input; the gated MLP gate, silu(gate), up
# and the product (down_proj's input). RoPE keeps only cos/sin (shared). A frozen weight's linear
# keeps no input, a LoRA one keeps its A output (r) and, with dropout, the dropped input and mask.
# GPT-2: LayerNorm keeps x and 2 statistics; c_attn's fused qkv (3d; sdpa may copy q too), sdpa's output and
# log-sum-exp, c_proj's input; gelu_new keeps 3 ff-sized intermediates beside c_fc's output and
# c_proj's input.

def activation_bytes(sh, n_tok, lora_cfg=None, cuda_bf16=False, grad_ckpt=False, fused_head=False, linears=()):
    """Bytes saved for backward by one training forward over n_tok tokens (all labeled: the bound).
    sh: `shape(model)`; lora_cfg: the run config when the party trains LoRA adapters, else None
    (full fine-tuning); linears: `_linears(model)` (names decide which are adapted)."""
    L, d, H, dkv, ff, V = sh["L"], sh["d"], sh["H"], sh["dkv"], sh["ff"], sh["V"]
    a = 2 if cuda_bf16 else 4  # activation element bytes
    full = lora_cfg is None
    tgt = None if full else targets(lora_cfg)
    per_layer = {}  # linear short name -> adapted?
    for name, _, _ in linears:
        if ".layers.0." in name or ".h.0." in name:
            per_layer[name.rsplit(".", 1)[-1]] = full or _adapted(name, tgt)
    trains = lambda lin: full or per_layer.get(lin, False)
    # under autocast a linear with fp32 weights (all of them in full fine-tuning; LoRA's A, whose
    # input peft first casts to fp32) keeps its own bf16 copy of its input
    casts = cuda_bf16
    lora_x = 0.0
    if not full:  # A outputs (r) and, with dropout, the dropped input (a bytes) and its mask (1 byte) per adapted linear
        r, p = lora_cfg["lora"], lora_cfg["lora_dropout"]
        lora_x = sum(r * 4 + (din * (a + 1) if p > 0 else 0) for name, din, _ in linears
                     if (".layers.0." in name or ".h.0." in name) and _adapted(name, tgt))
    if sh["kind"] == "gpt2":
        norm = lambda: d * 4 + 2 * 4  # LayerNorm: x and (mean, rstd)
        layer = (2 * norm() + (d * a if trains("c_attn") else 0) + (d * a if trains("c_fc") else 0)
                 + (3 * d + d) * a + H * 4 + (d * a if trains("c_proj") else 0)
                 + 4 * ff * a + (ff * a if trains("c_proj") else 0))
    else:
        qkv = [x for x in ("q_proj", "k_proj", "v_proj") if trains(x)]
        gu = [x for x in ("gate_proj", "up_proj") if trains(x)]
        pre = d * 4 if full else 0  # x·rsqrt is kept only for a trainable norm weight
        norm = lambda consumers: d * 4 + 4 + pre + (d * a * (len(consumers) if casts else 1) if consumers else 0)
        layer = (norm(qkv) + norm(gu) + (sh["dq"] + 2 * dkv + d) * a + H * 4 + (d * a if trains("o_proj") else 0)
                 + 3 * ff * a + (ff * a if trains("down_proj") else 0))
    layer += lora_x
    final = d * 4 + 8 if sh["kind"] == "gpt2" else d * 4 + 4 + (d * 4 if full else 0)  # the final norm
    embed = 8 if full else 0  # the ids, kept by a trainable embedding
    if grad_ckpt:  # each layer's input, and one layer's activations while it is recomputed
        layers = L * d * (4 if not cuda_bf16 or full else a) + layer
    else:
        layers = L * layer
    if fused_head:  # kernel state: tok, row, lab (int64) and lse (fp32) per token, the normed hidden states;
        # in backward its d_logits chunk (V·d/16 elements) and an fp32 grad_hidden accumulator
        return n_tok * (embed + layers + final + 28 + d * a + d * 4) + V * d * a // 16
    head = (d * 4 if full else 0) + 24  # the gathered hidden rows (trainable head only), indices, output
    return n_tok * (embed + layers + final + head) + min(n_tok, max(1, CHUNK_LOGITS // V)) * V * 4


def train_rows(cfg) -> int:
    """Rows of the largest training step (see the module docstring)."""
    dard = 2 * cfg["distill_batch"] + (cfg["local_batch"] if cfg["lam"] > 0 else 0)
    return max(dard, cfg["local_batch"], cfg["warm_batch"] if not cfg.get("llm") else 0)


def party_plan(model, cfg, name) -> dict:
    """Bytes (and the trainable count) of one party under `cfg`; `model` unwrapped (no adapters yet),
    on any device (meta included)."""
    cuda = cfg["device"].startswith("cuda")
    cuda_bf16 = cuda and cfg["dtype"] == "bf16"
    lora = uses_lora(cfg, name)
    params = list(model.parameters())
    n_all = sum(p.numel() for p in params)
    lins = _linears(model)
    if lora:
        tgt = targets(cfg)
        adapted = [(din, dout) for n, din, dout in lins if _adapted(n, tgt)]
        n_train, n_tensors = sum(cfg["lora"] * (din + dout) for din, dout in adapted), 2 * len(adapted)
        weights = n_all * (2 if cuda_bf16 else 4) + n_train * 4
    else:
        n_train, n_tensors = n_all, len(params)
        weights = n_all * 4
    sh = shape(model)
    act = activation_bytes(sh, train_rows(cfg) * cfg["max_len"], cfg if lora else None, cuda_bf16,
                           cfg.get("grad_ckpt", False), fused_head=cuda, linears=lins)
    kv_el = 2 if cuda_bf16 else 4
    per_pos = 2 * sh["L"] * (sh["dkv"] if sh["kind"] == "llama" else sh["d"]) * kv_el  # K and V, every layer
    gen = cfg["eval_batch"] * (cfg["max_len"] * per_pos + sh["V"] * 4 * 2)  # cache, and a step's logits (+ softmax)
    return dict(params=n_all, trainable=n_train, weights=weights, grads=n_train * 4,
                optimizer=n_train * 8 + n_tensors * 4, activations=act, generation=gen)


def plan(cfg, models: dict) -> dict:
    """{party: party_plan} and the total of the module docstring."""
    rows = {n: party_plan(m, cfg, n) for n, m in models.items()}
    static = sum(r["weights"] + r["grads"] + r["optimizer"] for r in rows.values())
    transient = max((max(r["activations"], r["generation"]), n) for n, r in rows.items())
    return dict(parties=rows, static=static, transient=transient[0], peak_party=transient[1],
                total=static + transient[0])


def available_bytes(device: str) -> tuple[int, str]:
    """(free bytes, what they are) of the device: torch.cuda.mem_get_info on CUDA, MemAvailable on a CPU."""
    if device.startswith("cuda"):
        free, total = torch.cuda.mem_get_info(torch.device(device))
        return free, f"{device} has {free / GB:.1f} GB free of {total / GB:.1f} GB"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
                return free, f"the CPU has {free / GB:.1f} GB of RAM available"
    except OSError:
        pass
    free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return free, f"the CPU has {free / GB:.1f} GB of RAM available"


def format_plan(p: dict) -> str:
    unit, u = ("GB", GB) if p["total"] >= GB else ("MB", 1e6)
    lines = ["memory plan:", f"{'party':<6} {'params':>9} {'trainable':>10} {'weights':>8} {'grads':>8} {'optimizer':>9} "
             f"{'activations':>11} {'generation':>10}  ({unit}; activations: the largest training step, "
             "generation: KV cache + logits)"]
    for n, r in p["parties"].items():
        lines.append(f"{n:<6} {r['params'] / 1e6:>8.2f}M {r['trainable'] / 1e6:>9.3f}M {r['weights'] / u:>8.2f} "
                     f"{r['grads'] / u:>8.2f} {r['optimizer'] / u:>9.2f} {r['activations'] / u:>11.2f} "
                     f"{r['generation'] / u:>10.2f}")
    lines.append(f"total {p['total'] / u:.2f} {unit} = {p['static'] / u:.2f} held (weights, grads, optimizer) + "
                 f"{p['transient'] / u:.2f} for the largest step ({p['peak_party']})")
    return "\n".join(lines)


def advice(p: dict, cfg) -> str:
    """What to change, from the largest term of the plan."""
    rows = p["parties"]
    big = max(rows, key=lambda n: rows[n]["grads"] + rows[n]["optimizer"])
    r = rows[p["peak_party"]]
    held = rows[big]["grads"] + rows[big]["optimizer"]
    if held >= p["transient"] and rows[big]["trainable"] == rows[big]["params"]:
        parties = "all" if cfg.get("lora") else big
        return f"train {big} with LoRA (--lora 16 --lora_parties {parties}) or bring smaller models"
    if r["generation"] >= r["activations"]:
        return f"lower --eval_batch (now {cfg['eval_batch']}) or --max_len (now {cfg['max_len']})"
    ckpt = "" if cfg.get("grad_ckpt") else "add --grad_ckpt, or "
    return (f"{ckpt}lower --distill_batch/--local_batch (now {cfg['distill_batch']}/{cfg['local_batch']}) "
            f"or --max_len (now {cfg['max_len']})")


def check(cfg, models: dict, strict=True, out=print) -> dict:
    """Print the plan; if its total exceeds HEADROOM of the device's free memory, PlanError (one
    line) when `strict`, else a one-line warning. federated.py is strict for --llm/--slms; the zoo
    presets only warn, since their generated sequences are far shorter than the --max_len bound."""
    p = plan(cfg, models)
    out(format_plan(p))
    free, where = available_bytes(cfg["device"])
    if p["total"] > HEADROOM * free:
        msg = f"the memory plan needs {p['total'] / GB:.1f} GB but {where}; {advice(p, cfg)}"
        if strict:
            raise PlanError(msg)
        out(f"memory plan: warning: {msg} (a bound: it takes every sequence as --max_len tokens long)")
    return p


def main(argv=None) -> int:
    """python memory.py --llm DIR --slms DIR,DIR [federated.py flags]: the plan of a run with these
    checkpoints, from their config.json alone (no weights read; --device cuda works without a GPU)."""
    args = config.parse_args(argv)
    args.preset = args.preset or ("smoke" if args.smoke else "default")
    try:
        cfg = config.resolve_config(args, device_here=False)  # a plan for --device cuda needs no GPU here
        if not (cfg["llm"] and cfg["slms"]):
            raise ValueError("give --llm DIR and --slms DIR,DIR (checkpoint directories; config.json is enough)")
        dirs = [cfg["llm"]] + cfg["slms"].split(",")
        names = ["llm"] + [f"slm{k + 1}" for k in range(len(dirs) - 1)]
        check_parties(cfg, names)
        models = {n: meta_model(d) for n, d in zip(names, dirs)}
        if cfg["device"].startswith("cuda") and not torch.cuda.is_available():
            print(format_plan(plan(cfg, models)))
            print(f"(no CUDA device here: the plan is not compared with {cfg['device']}'s memory)")
        else:
            check(cfg, models)
    except (ModelError, ValueError) as e:
        print(f"memory.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
