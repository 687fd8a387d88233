# The default preset's warm-up of one party on this CPU in fp32 (torch head): same data, seed, init and
# batch order as the H200 run, so the batch losses printed every 150 steps compare one to one.
import os, sys; sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", ".."))
import torch
import federated as F
torch.set_num_threads(1)
args = F.parse_args(["--scenario", "hetero", "--preset", "default", "--device", "cpu", "--cache", "/tmp/cache_" + sys.argv[1]])
cfg = F.resolve_config(args)
splits = F.make_data(cfg, 3)
F.build_parties(cfg, splits, only=[sys.argv[1]])
