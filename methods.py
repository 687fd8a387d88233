"""methods.py: spec §2's two tables as data: the scenarios (who takes part, who learns, FedAvg) and
the methods (each a choice of allocation and loss of the one loop; v2's plug-in, spec §4')."""

# method -> (allocation, loss) of the host loop; spec §2's table (v1) and §4''s (v2)
METHODS = {"local": (None, None), "fedmkt": ("fedmkt", "sft"),
           # LaDa v2 (spec §4'): the host fedmkt, unchanged, plus a plug-in (PLUGIN) on a subset of its allocation
           "lada": ("fedmkt", "sft"), "lada-random": ("fedmkt", "sft"), "lada-sft": ("fedmkt", "sft"),
           "lada-nofilter": ("fedmkt", "sft"),
           # LaDa v1 (spec §2-§4), kept so that the recorded grid reproduces (its result files say lada,
           # lada-filter, lada-loss: see compare.V1)
           "lada-v1": ("filter", "dard"), "lada-v1-filter": ("filter", "sft"), "lada-v1-loss": ("all", "dard"),
           "random": ("random", "dard"),
           "fedavg": (None, None),  # homo only: FedAvg of the SLMs and nothing else (`local` has no FedAvg)
           "oracle": ("oracle", "sft")}  # the testbed's headroom check: every correct teacher path of the pool
# scenario -> what it means (spec §2's scenario table): which of the preset's heterogeneous SLMs take part
# (indices; homo: the first one three times, one architecture and tokenizer), whether the LLM learns (llm2slm:
# frozen, only the LLM -> SLM direction), whether the SLMs FedAvg their weights each round (FedMKT's homogeneous
# setting, for every method but local), whether the SLMs start from one initialization
SCENARIOS = {
    "hetero": dict(slms=(0, 1, 2), llm_learns=True, fedavg=False, shared_init=False),
    "homo": dict(slms=(0, 0, 0), llm_learns=True, fedavg=True, shared_init=True),
    "one2one": dict(slms=(2,), llm_learns=True, fedavg=False, shared_init=False),
    "llm2slm": dict(slms=(0, 1, 2), llm_learns=False, fedavg=False, shared_init=False),
}
# v2 method -> (the plug-in's pick A_k from the host's H_k, the plug-in's loss); spec §4''s table
PLUGIN = {"lada": ("filter", "dard2"), "lada-random": ("random", "dard2"), "lada-sft": ("filter", "sft"),
          "lada-nofilter": ("all", "dard2")}


def uses_filter(method: str) -> bool:
    """Does the method have LaDa filters (one per client and direction)?"""
    return METHODS[method][0] == "filter" or PLUGIN.get(method, (None,))[0] == "filter"
