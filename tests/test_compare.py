"""compare.py: the tables are built from result files alone, with hand-computed means, stds and bold."""
import json

import compare


def _result(acc, mb=0.05, sec=10.0):
    return {"config": {}, "initial": {k: 0.0 for k in acc},
            "rounds": [{"round": 1, "accuracy": acc, "bytes": {"down": mb * 1e6, "up": 0}, "seconds": sec}]}


def test_tables_mean_std_bold_and_gain(tmp_path):
    d = tmp_path / "hetero"
    d.mkdir()
    runs = {("local", 0): {"llm": 0.70, "slm1": 0.10}, ("local", 1): {"llm": 0.72, "slm1": 0.20},
            ("lada", 0): {"llm": 0.60, "slm1": 0.30}, ("lada", 1): {"llm": 0.62, "slm1": 0.40}}
    for (m, s), acc in runs.items():
        (d / f"{m}-s{s}.json").write_text(json.dumps(_result(acc)))
    md = compare.tables(tmp_path)
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in md.splitlines()
            if line.startswith("| local") or line.startswith("| lada")}
    # local: llm mean 71.0, std 1.4 (sample std of 70, 72); slm1 15.0 ± 7.1
    assert rows["local"][:3] == ["**71.0 ± 1.4**", "15.0 ± 7.1", "15.0 ± 7.1"]
    assert rows["lada"][:3] == ["61.0 ± 1.4", "**35.0 ± 7.1**", "**35.0 ± 7.1**"]
    assert rows["lada"][3:] == ["0.05", "10"]  # MB per round, seconds per round
    assert "LaDa vs the best baseline (local) on the SLM mean: +20.0 points; LLM: -10.0 points." in md
    assert "(2 seed(s)" in md
