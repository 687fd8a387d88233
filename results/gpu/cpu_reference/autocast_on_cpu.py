# slm3 of the default preset: the first warm-up steps at batch 8 on the CPU, fp32 vs bf16 autocast (torch head)
import os, sys, time, random, contextlib
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", ".."))
import torch
import federated as F
from distill import TokenizedSet, sft_loss, make_optimizer, optimizer_step
from models import new_party
torch.set_num_threads(1)
mode, steps = sys.argv[1], int(sys.argv[2])
cfg = F.resolve_config(F.parse_args(["--scenario", "hetero", "--preset", "default", "--device", "cpu"]))
splits = F.make_data(cfg, 3)
corpus = [p["question"] + "\n" + p["answer"] for p in splits["public"] + splits["general"]]
model, tok = new_party("llama-1m", ("char",), corpus, 3)
data = TokenizedSet(tok, splits["clients"][2]["private"], 1024)
batches = data.batches(8, random.Random(3))
opt = make_optimizer(model, 3e-3, betas=(0.9, 0.98))
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50) * max(0.1, 1 - s / 1500))
amp = torch.autocast("cpu", dtype=torch.bfloat16) if mode == "bf16" else contextlib.nullcontext()
losses, t0 = [], time.time()
model.train()
for s in range(steps):
    with amp:
        loss = sft_loss(model, data.batch(next(batches)))
        optimizer_step(model, opt, loss)
    sched.step()
    losses.append(loss.item())
    if (s + 1) % 25 == 0:
        print(mode, s + 1, f"{time.time() - t0:.0f} s", "mean loss of last 25:", round(sum(losses[-25:]) / 25, 3), flush=True)
