import os, sys, time
os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", ".."))
import torch, random
import federated as F
from distill import TokenizedSet
from models import new_party, hidden_and_head
from kernels.seq_logprob import seq_logprob, seq_logprob_reference, _SeqLogprobFunction
cfg = F.resolve_config(F.parse_args(["--scenario", "hetero", "--preset", "default", "--device", "cpu"]))
splits = F.make_data(cfg, 3)
corpus = [p["question"] + "\n" + p["answer"] for p in splits["public"] + splits["general"]]
name = sys.argv[1]; zoo, tok_spec = dict(slm3=("llama-1m", ("char",)), slm1=("qwen2-3m", ("bpe", 640)))[name]
model, tok = new_party(zoo, tok_spec, corpus, 3)
data = TokenizedSet(tok, splits["clients"][2]["private"], 1024)
rng = random.Random(3)
idx = next(data.batches(int(sys.argv[2]), rng))
enc = data.batch(idx)
print("batch", enc["input_ids"].shape, "kept", int((enc["labels"] != -100).sum()), "vocab", len(tok))
h, w = hidden_and_head(model, enc["input_ids"])
h = h.detach().requires_grad_(); w = w.detach().requires_grad_()
g = torch.randn(h.shape[0])
t = time.time()
out = _SeqLogprobFunction.apply(h, w, enc["labels"], -100); (out * g).sum().backward()
print("triton interpreted", time.time() - t, "s")
gh, gw = h.grad.clone(), w.grad.clone(); h.grad = w.grad = None
h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
ref = seq_logprob_reference(h64, w64, enc["labels"]); (ref * g.double()).sum().backward()
rel = lambda a, b: float((a.double() - b).norm() / b.norm())
print("logp max abs err", float((out.double() - ref).abs().max()), "gh rel", rel(gh, h64.grad), "gw rel", rel(gw, w64.grad))
print("gh on masked positions (should be 0):", float(gh.reshape(-1, gh.shape[-1])[(enc["labels"] == -100).reshape(-1)].abs().max()))
