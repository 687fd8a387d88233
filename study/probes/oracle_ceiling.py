"""How far could an oracle lift each testbed SLM? A probe outside the federated loop (validation sets only).

    python study/probes/oracle_ceiling.py --cache DIR [--extra 500] [--steps 60,240] [--slm_zoo a,b,c] [--pretrain N] [flags of federated.py]

For each client k of the testbed (seed 0 unless --seed): its warmed-up SLM (from --cache, else warmed
up there), its accuracy on its validation set, then SFT from that model on its private data plus
`--extra` gold solutions of public-pool problems (what an oracle's correct teacher paths look like,
about 100 a round over 5 rounds) for each of `--steps` step counts (batch 16, the round lr), and
the validation accuracy after each. `--slm_zoo` swaps the three SLMs for other sizes ("arch:d:layers:d_ff"
each, tokenizers unchanged). `--pretrain N` warms each SLM up on N gold solutions of the `general` set (the
shared domains only, never in a pool) besides its private problems, as a pretrained SLM would start.
Accuracies are graded as the preset says (`--grading`; the testbed: checked). The oracle of the loop trains about 12 steps a round (60 in 5
rounds); if even 240 steps on 500 correct paths do not lift an SLM by 10 points, no allocation can.
"""

import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import config as C  # noqa: E402
import parties as F  # noqa: E402
from data import with_solutions  # noqa: E402
from distill import warm_up  # noqa: E402
from models import ZOO  # noqa: E402
import eval as ev  # noqa: E402


def main():
    argv = sys.argv[1:]
    extra = int(argv[argv.index("--extra") + 1]) if "--extra" in argv else 500
    steps = [int(s) for s in (argv[argv.index("--steps") + 1] if "--steps" in argv else "60,240").split(",")]
    if "--slm_zoo" in argv:  # e.g. qwen2:128:3:352,gpt2:128:3:352,llama:128:3:352
        hetero = C.PARTIES["cpu"]["hetero"]
        for k, spec in enumerate(argv[argv.index("--slm_zoo") + 1].split(",")):
            arch, d, n_layer, d_ff = spec.split(":")
            name = f"{arch}-probe-{d}-{n_layer}"
            ZOO[name] = dict(arch=arch, d_model=int(d), n_layer=int(n_layer), n_head=4, d_ff=int(d_ff))
            hetero[k] = (name, hetero[k][1])
    pretrain = int(argv[argv.index("--pretrain") + 1]) if "--pretrain" in argv else 0
    for flag in ("--extra", "--steps", "--slm_zoo", "--pretrain"):
        if flag in argv:
            i = argv.index(flag)
            argv = argv[:i] + argv[i + 2:]
    cfg = C.resolve_config(C.parse_args(["--scenario", "hetero", "--preset", "testbed", "--device", "cpu"] + argv))
    splits = F.make_data(cfg, 3)
    for k, c in enumerate(splits["clients"]):  # warm-up data only; extra training below uses the private set alone
        c["own"] = c["private"]
        c["private"] = random.Random(k).sample(splits["general"], pretrain) + c["private"] if pretrain else c["private"]
    parties = F.build_parties(cfg, splits, only=["slm1", "slm2", "slm3"])
    pool = with_solutions(splits["public"])
    for k, (name, party) in enumerate(parties.items()):
        splits["clients"][k]["private"] = splits["clients"][k]["own"]
        val = splits["clients"][k]["val"]
        acc = lambda m: ev.evaluate(m, party.tok, val, batch_size=128, max_new_tokens=cfg["max_new_tokens"])[cfg["grading"]]  # noqa: E731
        base = acc(party.model)
        rng = random.Random(cfg["seed"] * 100 + k)
        data = splits["clients"][k]["private"] + rng.sample(pool, extra)
        row = [f"{name} {cfg['parties']} ({cfg['grading']}, pretrain {pretrain}): after warm-up {100 * base:.1f}%"]
        state = {n: p.detach().clone() for n, p in party.model.state_dict().items()}
        for s in steps:
            party.model.load_state_dict(state)
            warm_up(party.model, party.tok, data, steps=s, batch_size=16, lr=cfg["lr"], seed=k, desc=f"{name} +{s}")
            row.append(f"+{s} steps on {len(data)} examples: {100 * acc(party.model):.1f}%")
        print("; ".join(row), flush=True)


if __name__ == "__main__":
    main()
