"""compare.py: tables, paired differences, intervals and verdicts from result files alone, against
hand-computed values and the normal approximation of a paired mean."""
import json
import math
from pathlib import Path

import numpy as np

import methods
from study import compare


def _bits(k, n):
    """k ones then n - k zeros."""
    return "1" * k + "0" * (n - k)


def _result(final: dict, initial: dict = None, mb=0.05):
    initial = initial or {p: "0" * len(b) for p, b in final.items()}
    acc = lambda c: {p: b.count("1") / len(b) for p, b in c.items()}
    return {"config": {}, "initial": acc(initial), "initial_correct": initial, "wall_seconds": 30.0,
            "rounds": [{"round": 1, "accuracy": acc(final), "correct": final, "bytes": {"down": mb * 1e6}, "seconds": 10.0}]}


def _write(d, name, res):
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{name}.json").write_text(json.dumps(res))


def test_paired_difference_constant_and_against_normal_approximation():
    n = 400
    a = {s: _result({"slm1": _bits(100, n)}) for s in range(3)}
    b = {s: _result({"slm1": _bits(0, n)}) for s in range(3)}
    # every seed: +1 on the first 100 problems, 0 elsewhere: mean 0.25; the bootstrap over seeds adds nothing
    # (they are equal), so the interval is the paired mean's: 0.25 +- 1.96 sqrt(0.25 * 0.75 / (3 n)) roughly
    # for the within-seed resampling of 3 x 400 problems (3 means averaged)
    d, lo, hi, ns = compare.paired(a, b, compare.SLM, n_boot=4000)
    assert ns == 3 and math.isclose(d, 25.0)
    half = 100 * 1.96 * math.sqrt(0.25 * 0.75 / (3 * n))
    assert abs((hi - lo) / 2 - half) < 0.15 * half and abs((hi + lo) / 2 - 25.0) < 0.5
    same = compare.paired(a, a, compare.SLM)
    assert same[:3] == (0.0, 0.0, 0.0)


def test_paired_resamples_seeds():
    # seed 0 gains 40 points, seeds 1 and 2 gain nothing; no within-seed noise (all or none of a block)
    a = {0: _result({"slm1": _bits(40, 100)}), 1: _result({"slm1": _bits(0, 100)}), 2: _result({"slm1": _bits(0, 100)})}
    b = {s: _result({"slm1": _bits(0, 100)}) for s in range(3)}
    d, lo, hi, _ = compare.paired(a, b, compare.SLM, n_boot=3000)
    assert math.isclose(d, 40 / 3)
    # seeds drawn with replacement: all-three-zero-gain samples happen ((2/3)^3 = 30%), so the interval reaches 0
    assert lo <= 1e-9 and hi > 30


def test_verdict_rule():
    assert compare.verdict((5.0, 1.0, 9.0, 3)) == "supported"
    assert compare.verdict((-5.0, -9.0, -1.0, 3)) == "contradicted"
    assert compare.verdict((1.0, -1.0, 3.0, 3)) == "not decided"
    assert compare.verdict((-5.0, -9.0, -1.0, 3), direction=-1) == "supported"
    assert compare.verdict(None) == "not run"


def test_tables_headroom_and_hypotheses(tmp_path):
    n = 50
    for s in range(3):
        init = {"llm": _bits(40, n), "llm-private": _bits(5, n), "slm1": _bits(5, n), "slm2": _bits(5, n)}
        _write(tmp_path / "headroom", f"local-s{s}", _result(
            {"llm": _bits(40, n), "llm-private": _bits(5, n), "slm1": _bits(5, n), "slm2": _bits(5 + s, n)}, init))
        _write(tmp_path / "headroom", f"oracle-s{s}", _result(
            {"llm": _bits(41, n), "llm-private": _bits(15, n), "slm1": _bits(15, n), "slm2": _bits(20, n)}, init))
        for m, k in {"local": 5, "fedmkt": 6, "random": 7, "lada-filter": 7, "lada-loss": 7, "lada": 12}.items():
            _write(tmp_path / "hetero", f"{m}-s{s}", _result(
                {"llm": _bits(40, n), "llm-private": _bits(5, n), "slm1": _bits(k, n), "slm2": _bits(k, n)}, init))
    md, ok = compare.headroom(tmp_path)
    # oracle - local, SLM mean: slm1 +10/50 = 20 points; slm2 (15 - s)/50 = 30, 28, 26 -> mean 28; parties: 24
    assert ok and "+24.0 [" in md[-1] and "Headroom: **yes**" in md[-1]
    text = compare.tables(tmp_path)
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in text.splitlines()
            if line.startswith("| ")}
    # lada: slm1 = 12/50 = 24% in every seed; SLM mean 24.0 +- 0.0; warm-up row: slm1 10%
    assert rows["lada"][2] == "24.0 ± 0.0" and rows["lada"][4] == "24.0 ± 0.0"
    assert rows["after warm-up"][2] == "10.0 ± 0.0"
    assert rows["lada"][-1] == "10"  # s/run: the run's own records (one 10 s round), not a process's wall time
    h1 = next(line for line in text.splitlines() if line.startswith("| H1 hetero"))
    # lada - random: +1 on 5 of 50 problems of each SLM in every seed: 10 points, interval above 0
    assert "best baseline (random)" in h1 and "| +10.0 [+" in h1 and h1.endswith("| supported |")
    h2 = [line for line in text.splitlines() if line.startswith("| H2 hetero")]
    assert len(h2) == 2 and all("+0.0 [+0.0, +0.0]" in line and "not decided" in line for line in h2)
    # with local far better than oracle the headroom fails
    for s in range(3):
        _write(tmp_path / "headroom", f"oracle-s{s}", _result({"llm": _bits(40, n), "llm-private": _bits(5, n),
                                                               "slm1": _bits(6, n), "slm2": _bits(6, n)}))
    assert compare.headroom(tmp_path)[1] is False
    assert np.isclose(compare.correct(_result({"a": "0110"}), "a").sum(), 2)


def test_grid_waits_for_the_headroom_check_of_its_seeds(tmp_path, monkeypatch, capsys):
    """The grid refuses to start while the headroom check lacks one of its seeds, even if the seeds it
    has pass; it starts once every seed passes."""
    n = 50
    res = tmp_path / "results" / compare.PRESET
    for s in (0, 1):
        _write(res / "headroom", f"local-s{s}", _result({"llm-private": _bits(5, n), "slm1": _bits(5, n)}))
        _write(res / "headroom", f"oracle-s{s}", _result({"llm-private": _bits(15, n), "slm1": _bits(15, n)}))
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "study.md").write_text(f"# x\n<!-- tables:{compare.PRESET}:begin -->\nold\n<!-- tables:{compare.PRESET}:end -->\nend\n")
    ran = []
    monkeypatch.setattr(compare, "ROOT", tmp_path)
    def fake_run(scen, m, seed, extra, dest, workdir):  # a finished run leaves its result file, as run_one does
        ran.append((scen, m, seed))
        _write(dest.parent, dest.stem, _result({"llm": _bits(1, 4), "slm1": _bits(1, 4)}))

    monkeypatch.setattr(compare, "run_one", fake_run)
    monkeypatch.setattr(compare, "plot", lambda *a: None)
    assert compare.main(["--seeds", "0,1,2", "--scenarios", "hetero", "--methods", "local", "--workdir", str(tmp_path / "w")]) == 2
    assert "lacks seed(s) [2]" in capsys.readouterr().err and not ran
    assert compare.main(["--seeds", "0,1", "--scenarios", "hetero", "--methods", "local", "--workdir", str(tmp_path / "w")]) == 0
    gap = lambda s: [("one2one", m, s) for _ in ("mid", "large") for m in ("lada-loss", "lada")]  # noqa: E731
    assert ran == [("hetero", "local", 0), ("hetero", "local", 1)] + gap(0) + gap(1)  # scenario by scenario
    readme = (tmp_path / "docs" / "study.md").read_text()  # the tables land between the study document's markers
    assert "old" not in readme and "Headroom: **yes**" in readme and readme.endswith("end\n")
    # the whole order: every scenario without lada-loss (random after lada, fedavg in homo only), then the
    # gap runs; the scenarios' lada-loss runs (the costliest, read by no hypothesis) only when asked, last
    order = [t[:3] for t in compare.grid_runs(["hetero", "homo"], compare.RUN_ORDER, [0, 1])]
    rest = lambda scen: ["local"] + (["fedavg"] if scen == "homo" else []) + ["fedmkt", "lada", "random", "lada-filter"]  # noqa: E731
    assert order == [(sc, m, s) for sc in ("hetero", "homo") for s in (0, 1) for m in rest(sc)] + gap(0) + gap(1)
    every = [t[:3] for t in compare.grid_runs(["hetero", "homo"], compare.RUN_ORDER, [0, 1], scenario_lada_loss=True)]
    assert every == order + [(sc, "lada-loss", s) for sc in ("hetero", "homo") for s in (0, 1)]


def test_a_run_from_other_warm_ups_supersedes_the_runs_beside_it(tmp_path, monkeypatch):
    """Runs of one folder and seed must start from the same warmed-up models: a new run whose warm-up
    losses differ from those of the committed runs beside it moves them to superseded/warm-ups/ (to be
    run again); runs of other seeds, runs with the same warm-ups, and parties of another model (the
    gap runs' mid-size LLM beside the large one) are left alone."""
    monkeypatch.setattr(compare, "RESULTS", tmp_path / "results")
    res = tmp_path / "results" / compare.PRESET

    def run(seed, llm=("llama-cpu-l", 0.0621), slm=0.093):
        r = _result({"llm": _bits(1, 4), "slm1": _bits(1, 4)})
        r["config"] = {"seed": seed}
        r["parties"] = {"llm": {"zoo": llm[0], "warm_loss": llm[1]}, "slm1": {"zoo": "llama-tb", "warm_loss": slm}}
        return r

    _write(res / "gap", "large-lada-s1", run(1))
    _write(res / "gap", "large-lada-loss-s2", run(2))  # another seed
    new = run(1, llm=("llama-cpu-m", 0.0669))  # the mid-size LLM: another model, the same SLM warm-up
    _write(res / "gap", "mid-lada-s1", new)
    assert compare.supersede_other_warm_ups(res / "gap" / "mid-lada-s1.json", new) == []
    new = run(1, llm=("llama-cpu-m", 0.0669), slm=0.0931)  # the SLM warmed up elsewhere: not bit-identical
    _write(res / "gap", "mid-lada-loss-s1", new)
    moved = compare.supersede_other_warm_ups(res / "gap" / "mid-lada-loss-s1.json", new)
    assert sorted(p.name for p in moved) == ["large-lada-s1.json", "mid-lada-s1.json"]
    assert all(p.parent == res / "superseded" / "warm-ups" / "gap" for p in moved)
    assert sorted(p.name for p in (res / "gap").iterdir()) == ["large-lada-loss-s2.json", "mid-lada-loss-s1.json"]


def test_tables_draw_one_figure_per_scenario_with_runs(tmp_path, monkeypatch):
    from optional import need

    need("matplotlib")
    res = tmp_path / "results" / compare.PRESET
    for scen in ("hetero", "homo", "followup"):
        for m, k in (("local", 5), ("lada", 9)):
            _write(res / scen, f"{m}-s0", _result({"llm": _bits(k, 20), "slm1": _bits(k, 20)}))
    (tmp_path / "README.md").write_text("# x\n")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "study-v2.md").write_text("v2\n<!-- tables:v2:begin -->\n<!-- tables:v2:end -->\n")
    monkeypatch.setattr(compare, "ROOT", tmp_path)
    assert compare.main(["--tables"]) == 0
    assert sorted(p.name for p in res.glob("accuracy_*.png")) == ["accuracy_followup.png", "accuracy_hetero.png", "accuracy_homo.png"]
    assert not (res / "v2").exists()  # no v2 run, no v2 figure
    for m, k in (("fedmkt", 7), ("lada-sft", 8)):  # v2's figure: its own methods, beside its runs
        _write(res / "v2" / "hetero", f"{m}-s6", _result({"llm": _bits(k, 20), "slm1": _bits(k, 20)}))
    assert compare.main(["--tables"]) == 0
    assert sorted(p.name for p in (res / "v2").glob("accuracy_*.png")) == ["accuracy_hetero.png"]
    study = (tmp_path / "docs" / "study-v2.md").read_text()  # the tables go into the test's study, not this checkout's
    assert "| fedmkt | 35.0 |" in study and "| lada-sft | 40.0 |" in study


def test_followup_waits_for_its_tuning_and_runs_each_method_at_its_chosen_scale(tmp_path, monkeypatch, capsys):
    res = tmp_path / "results" / compare.PRESET
    (tmp_path / "README.md").write_text("# x\n")
    monkeypatch.setattr(compare, "ROOT", tmp_path)
    monkeypatch.setattr(compare, "plot", lambda *a: None)
    ran = []
    def fake_run(scen, m, seed, extra, dest, workdir):  # a finished run leaves its result file, as run_one does
        ran.append((m, seed, extra))
        _write(dest.parent, dest.stem, _result({"llm": _bits(1, 4), "slm1": _bits(1, 4)}))

    monkeypatch.setattr(compare, "run_one", fake_run)
    w = ["--workdir", str(tmp_path / "w")]
    assert compare.main(["--followup"] + w) == 2 and not ran
    assert "tuning is not finished" in capsys.readouterr().err
    # F0 stage 1 (local at each local scale) as fake_run writes it: all tie, so the larger scale, 1.0, is chosen,
    # and stage 2 runs in the same call: validation sets only, seed 0
    assert compare.main(["--tune"] + w) == 0
    assert [(m, s) for m, s, _ in ran] == [("local", 0)] * 3 + [(m, 0) for m in compare.TUNE_METHODS
                                                                for _ in compare.TUNE_SCALES]
    assert all(e[:2] == ["--eval_split", "val"] for _, _, e in ran)
    assert [e[3] for _, _, e in ran] == ["1.0", "0.3", "0.1"] + ["1.0"] * 9  # --local_lr_scale
    # stage 1 again: local best at 0.3 (fewer SLM problems lost); stage 2 now reads the runs at local x0.3
    import shutil

    shutil.rmtree(res / "tune")
    assert compare.tuned_scales(res) is None
    for x, k in {1.0: 3, 0.3: 8, 0.1: 6}.items():
        _write(res / "tune", f"local-l{x}-s0", _result({"llm": _bits(10, 20), "slm1": _bits(k, 20), "slm2": _bits(k, 20)}))
    assert compare.tuned_local_scale(res) == 0.3 and compare.tuned_scales(res) is None
    # a tie in counts is a tie, even where the float means differ in the last bit (1+0+6 vs 0+0+7 of 200 each)
    tie = {0.3: (1, 0, 6), 0.1: (0, 0, 7), 1.0: (0, 0, 1)}
    for x, ks in tie.items():
        _write(res / "tune", f"local-l{x}-s0", _result({"llm": _bits(10, 200), **{f"slm{i + 1}": _bits(k, 200)
                                                                                   for i, k in enumerate(ks)}}))
    assert compare.slm_accuracy(compare.runs_of(res, "tune", "local-l0.3")[0]) < \
        compare.slm_accuracy(compare.runs_of(res, "tune", "local-l0.1")[0])
    assert compare.tuned_local_scale(res) == 0.3
    for x, k in {1.0: 3, 0.3: 8, 0.1: 6}.items():
        _write(res / "tune", f"local-l{x}-s0", _result({"llm": _bits(10, 20), "slm1": _bits(k, 20), "slm2": _bits(k, 20)}))
    stage2 = [t for t in compare.tune_runs(res) if t[1] != "local"]
    assert [t[3][3] for t in stage2] == ["0.3"] * 9 and stage2[0][-1].name == "fedmkt-l0.3-x1.0-s0.json"
    # SLM means on validation: fedmkt best at 1.0, lada-filter tied between 0.3 and 0.1 (-> 0.3), lada best at 0.1
    hits = {"fedmkt": {1.0: 8, 0.3: 6, 0.1: 4}, "lada-filter": {1.0: 3, 0.3: 7, 0.1: 7}, "lada": {1.0: 1, 0.3: 5, 0.1: 9}}
    for m, by in hits.items():
        for x, k in by.items():
            _write(res / "tune", f"{m}-l0.3-x{x}-s0", _result({"llm": _bits(10, 20), "slm1": _bits(k, 20),
                                                                "slm2": _bits(k, 20)}))
    assert compare.tuned_scales(res) == {"fedmkt": (0.3, 1.0), "lada-filter": (0.3, 0.3), "lada": (0.3, 0.1),
                                         "random": (0.3, 0.1), "local": (0.3, 1.0)}
    assert "Chosen (highest SLM mean): local step ×0.3; distillation fedmkt ×1.0, lada-filter ×0.3, lada ×0.1" in \
        compare.tables(res)
    ran.clear()
    assert compare.main(["--followup"] + w) == 0
    assert [(m, s) for m, s, _ in ran] == [(m, s) for s in compare.FOLLOWUP_SEEDS for m in compare.FOLLOWUP_METHODS]
    scale = {m: (float(e[e.index("--local_lr_scale") + 1]), float(e[e.index("--distill_lr_scale") + 1]))
             for m, s, e in ran if s == 3}
    assert scale == {"local": (0.3, 1.0), "fedmkt": (0.3, 1.0), "lada": (0.3, 0.1), "random": (0.3, 0.1),
                     "lada-filter": (0.3, 0.3)}
    extra = {m: e for m, s, e in ran if s == 4}
    assert extra["random"][-2:] == ["--counts_from", str(res / "followup" / "lada-s4.json")]
    # the follow-up's own hypotheses, F1-F4, from its results alone; interim while seeds are missing
    shutil.rmtree(res / "followup")
    for m, k in {"local": 2, "fedmkt": 4, "random": 4, "lada-filter": 5, "lada": 12}.items():
        _write(res / "followup", f"{m}-s3", _result({"llm": _bits(10, 40), "slm1": _bits(k, 40)}))
    assert "| 1 | supported (interim: 1 of 3 seeds) |" in "\n".join(compare.hypotheses(res))
    for s in compare.FOLLOWUP_SEEDS:
        for m, k in {"local": 2, "fedmkt": 4, "random": 4, "lada-filter": 5, "lada": 12}.items():
            _write(res / "followup", f"{m}-s{s}", _result({"llm": _bits(10, 40), "slm1": _bits(k, 40)}))
    md = "\n".join(compare.hypotheses(res))
    assert "| F1 hetero, tuned lr | lada − best baseline (fedmkt), SLM mean | +20.0 [" in md
    assert md.count("| F") == 5 and "| 3 | supported |" in md and "interim" not in md


def test_runs_are_claimed_so_that_processes_can_share_a_grid(tmp_path, monkeypatch):
    """A run another live process holds is left to it; when nothing else can start, the process waits
    and looks again, and F0's stage 2 (known once stage 1 is in) runs in the same call. A lock whose
    process is gone is taken over."""
    import os
    import subprocess
    import sys

    monkeypatch.setattr(compare, "ROOT", tmp_path)
    monkeypatch.setattr(compare, "plot", lambda *a: None)
    (tmp_path / "README.md").write_text("# x\n")
    w = tmp_path / "w"
    res = tmp_path / "results" / compare.PRESET
    first = next(compare.tune_runs(res))[-1]
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])  # the process that holds it
    try:
        lock = compare.claim(first, w)
        assert lock is not None and lock.read_text() == str(os.getpid())
        assert compare.claim(first, w) is None  # held by a live process (this one)
        lock.write_text(str(other.pid))
        ran, waits = [], []

        def fake_run(scen, m, seed, extra, dest, workdir):  # a finished run leaves its result file, as run_one does
            ran.append(dest)
            _write(dest.parent, dest.stem, _result({"llm": _bits(1, 4), "slm1": _bits(1, 4)}))

        def other_finishes(blocked, workdir):  # while this process waits, the other one finishes its run
            waits.append([t[-1] for t in blocked])
            _write(first.parent, first.stem, _result({"llm": _bits(1, 4), "slm1": _bits(1, 4)}))
            lock.unlink()

        monkeypatch.setattr(compare, "run_one", fake_run)
        monkeypatch.setattr(compare, "wait_for_others", other_finishes)
        assert compare.main(["--tune", "--workdir", str(w)]) == 0
        stage1 = [t[-1] for t in compare.tune_runs(res)][:3]
        assert waits == [[first]]  # it waited once, for the held run alone
        assert ran[:2] == stage1[1:] and first not in ran  # the held run was left to its holder
        assert len(ran) == 2 + len(compare.TUNE_METHODS) * len(compare.TUNE_SCALES)  # stage 2 after the wait
        assert not any((w / "locks").iterdir())  # every lock released
    finally:
        other.kill()
        other.wait()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    lock.write_text(str(gone.pid))  # its holder died: the next process takes it over
    assert compare.claim(first, w) == lock and lock.read_text() == str(os.getpid())


def test_random_waits_for_the_lada_run_another_process_holds(tmp_path, monkeypatch, capsys):
    """`random` takes its counts from lada's result: while another process runs that lada, this one
    waits for it, then runs random; with no process on it, it stops and names the run it cannot do."""
    import subprocess
    import sys

    monkeypatch.setattr(compare, "ROOT", tmp_path)
    monkeypatch.setattr(compare, "plot", lambda *a: None)
    (tmp_path / "README.md").write_text("# x\n")
    w = tmp_path / "w"
    res = tmp_path / "results" / compare.PRESET
    lada, rand = res / "hetero" / "lada-s0.json", res / "hetero" / "random-s0.json"
    ran, waits = [], []

    def fake_run(scen, m, seed, extra, dest, workdir):
        assert m != "random" or compare.counts_of(extra) == lada and lada.exists()
        ran.append(m)
        _write(dest.parent, dest.stem, _result({"llm": _bits(1, 4), "slm1": _bits(1, 4)}))

    monkeypatch.setattr(compare, "run_one", fake_run)
    flags = ["--force", "--scenarios", "hetero", "--seeds", "0", "--workdir", str(w)]
    # nothing runs lada and this process does not have it in its list: it stops, naming random (the gap
    # runs, which every grid list has, run)
    assert compare.main(flags + ["--methods", "random"]) == 0
    out = capsys.readouterr().out
    assert "random" not in ran and "left that this process cannot run (their counts come from runs not in its list): results/testbed/hetero/random-s0.json" in out
    ran.clear()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        lock = compare.lock_path(lada, w)
        lock.write_text(str(other.pid))  # another process runs lada

        def other_finishes(blocked, workdir):
            waits.append([t[-1] for t in blocked])
            _write(lada.parent, lada.stem, _result({"llm": _bits(1, 4), "slm1": _bits(1, 4)}))
            lock.unlink()

        monkeypatch.setattr(compare, "wait_for_others", other_finishes)
        # a run another process holds and nothing here depends on: left to it, no wait
        assert compare.main(flags + ["--methods", "lada"]) == 0
        assert not waits and not ran and "1 run(s) left to the other processes that hold them" in capsys.readouterr().out
        assert compare.main(flags + ["--methods", "random"]) == 0
        assert waits == [[rand]] and ran == ["random"]
    finally:
        other.kill()
        other.wait()


def test_jobs_start_processes_that_share_the_runs(tmp_path, monkeypatch, capsys):
    """--jobs N: N - 1 more compare.py processes (--worker, the same runs, cores / N threads each), this
    one runs too, waits for them, and only it builds the tables; a failed process fails the call."""
    monkeypatch.setattr(compare, "ROOT", tmp_path)
    monkeypatch.setattr(compare, "plot", lambda *a: None)
    monkeypatch.setattr(compare.os, "cpu_count", lambda: 16)
    (tmp_path / "README.md").write_text("# x\n")
    started, ran, codes = [], [], []

    class FakeProcess:
        def __init__(self, cmd, env, stdout, stderr):
            started.append((cmd, env["OMP_NUM_THREADS"], stdout.name))

        def wait(self):
            return codes.pop(0)

    def fake_run(scen, m, seed, extra, dest, workdir):
        ran.append((scen, m, seed))
        _write(dest.parent, dest.stem, _result({"llm": _bits(1, 4), "slm1": _bits(1, 4)}))

    monkeypatch.setattr(compare.subprocess, "Popen", FakeProcess)
    monkeypatch.setattr(compare, "run_one", fake_run)
    monkeypatch.setattr(compare.torch if hasattr(compare, "torch") else __import__("torch"), "set_num_threads", lambda n: None)
    w = str(tmp_path / "w")
    codes[:] = [0, 0, 0]
    assert compare.main(["--headroom", "--seeds", "0", "--jobs", "4", "--workdir", w]) == 0
    assert len(started) == 3 and {t for _, t, _ in started} == {"4"}  # 16 cores / 4
    cmd = started[0][0]
    assert cmd[1].endswith("compare.py") and "--worker" in cmd and "--headroom" in cmd and "--jobs" not in cmd
    assert cmd[cmd.index("--seeds") + 1] == "0" and cmd[cmd.index("--workdir") + 1] == w
    assert [Path(n).name for _, _, n in started] == ["job1.log", "job2.log", "job3.log"]
    assert ran == [("hetero", "local", 0), ("hetero", "oracle", 0)]
    assert (tmp_path / "results" / compare.PRESET / "tables.md").exists()
    codes[:] = [0, 1]
    (tmp_path / "results" / compare.PRESET / "tables.md").unlink()
    assert compare.main(["--headroom", "--seeds", "0", "--jobs", "3", "--workdir", w]) == 1
    assert "[2] of --jobs failed" in capsys.readouterr().err
    assert not (tmp_path / "results" / compare.PRESET / "tables.md").exists()  # no tables from a failed grid


def test_status_counts_runs_and_estimates_the_hours_left(tmp_path, monkeypatch):
    """--status: a finished run is done, a run whose lock a live process holds is running (charged for
    the rounds not yet in its log), a lock of a dead process is to do; each run is estimated by the
    median time of the finished runs of its method in its folder, else of its method, else of all."""
    import os
    import subprocess
    import sys

    res = tmp_path / "results" / compare.PRESET
    run = lambda method, setup, rounds: {"config": {"method": method}, "seconds": {"warm-up": setup},  # noqa: E731
                                         "rounds": [{"seconds": s} for s in rounds]}
    _write(res / "hetero", "local-s0", run("local", 100.0, [120.0, 80.0]))  # 300 s
    _write(res / "gap", "mid-lada-s1", run("lada", 0.0, [600.0]))  # 600 s, a seed outside the grid's
    _write(res / "v2" / "hetero", "fedmkt-s6", run("fedmkt", 50.0, [400.0]))  # 450 s, v2's first test run
    monkeypatch.setattr(compare, "ROOT", tmp_path)
    work = tmp_path / "w"
    live = compare.lock_path(res / "hetero" / "lada-s0.json", work)
    live.parent.mkdir(parents=True)
    live.write_text(str(os.getpid()))
    (work / "hetero" / "lada-s0").mkdir(parents=True)
    (work / "hetero" / "lada-s0" / "log.jsonl").write_text("{}\n{}\n")  # 2 of 5 rounds
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    compare.lock_path(res / "gap" / "mid-lada-s0.json", work).write_text(str(dead.pid))
    rows = {line.split(" | ")[0][2:]: line.strip("| ").split(" | ")
            for line in compare.status(res, work, [0], ["hetero"], ["local", "lada"]) if line.startswith("| ")}
    # grid: hetero local (done), hetero lada (running: 600 x 3/5 = 360), the 4 gap runs of seed 0 to do:
    # lada-loss has no finished run anywhere (median of all: 450), lada 600 -> 360 + 2 x 450 + 2 x 600 = 2460 s
    assert rows["grid"][1:] == ["6", "1", "1", "4", f"{2460 / 3600:.1f}"]
    assert rows["headroom"][1:] == ["2", "0", "0", "2", f"{(300 + 450) / 3600:.1f}"]  # local 300, oracle 450
    # F0: stage 1's 3 local runs (300 each), stage 2's 9 runs (fedmkt, lada-filter 450; lada 600)
    assert rows["follow-up F0"][1:] == ["12", "0", "0", "12", f"{(900 + 3 * (450 + 450 + 600)) / 3600:.1f}"]
    f14 = 3 * (300 + 450 + 600 + 450 + 450)  # local, fedmkt, lada, random, lada-filter on seeds 3-5
    assert rows["follow-up F1-F4"][1:] == ["15", "0", "0", "15", f"{f14 / 3600:.1f}"]
    assert rows["v2 gamma (validation)"][1:] == ["3", "0", "0", "3", f"{3 * 600 / 3600:.1f}"]  # lada at 3 gammas
    v2 = 3 * (300 + 600 + 450 + 450) + 2 * 450  # local, lada, lada-random, lada-sft; fedmkt's seeds 7-8
    assert rows["v2 test (hetero)"][1:] == ["15", "1", "0", "14", f"{v2 / 3600:.1f}"]
    assert rows["all"][-1] == f"{(2460 + 750 + 5400 + f14 + 1800 + v2) / 3600:.1f}"


def test_bad_flags_give_one_line_and_exit_2(capsys):
    assert compare.main(["--jobs", "0"]) == 2
    assert capsys.readouterr().err == "compare.py: error: --jobs 0: needs at least 1\n"
    assert compare.main(["--seeds", "0,x", "--status"]) == 2
    assert capsys.readouterr().err == "compare.py: error: --seeds 0,x: expected comma-separated integers\n"


def test_random_is_run_again_when_its_lada_run_changed(tmp_path, monkeypatch):
    """`random` must take the counts of its folder and seed's `lada` run: when they differ (the lada run
    was made again after random read it), random moves to superseded/counts/; when they match, or one
    of the two is missing, nothing moves."""
    monkeypatch.setattr(compare, "RESULTS", tmp_path / "results")
    d = tmp_path / "results" / compare.PRESET / "llm2slm"

    def run(*picked):
        r = _result({"llm": _bits(1, 4), "slm1": _bits(1, 4)})
        r["rounds"] = [dict(r["rounds"][0], round=i + 1, selected={"down/slm1": k}) for i, k in enumerate(picked)]
        return r

    _write(d, "random-s1", run(16, 9))
    assert compare.supersede_random_of_other_counts(d, 1) is None  # no lada run
    _write(d, "lada-s1", run(16, 9))
    assert compare.supersede_random_of_other_counts(d, 1) is None  # the same counts
    _write(d, "lada-s1", run(16, 8))  # lada made again: round 2 picked 8
    moved = compare.supersede_random_of_other_counts(d, 1)
    assert moved == tmp_path / "results" / compare.PRESET / "superseded" / "counts" / "llm2slm" / "random-s1.json"
    assert moved.exists() and not (d / "random-s1.json").exists() and (d / "lada-s1.json").exists()


def test_lada_random_is_run_again_when_its_lada_run_changed(tmp_path, monkeypatch):
    """v2: `lada-random` takes lada's count, or all of its own host allocation H_k where that is smaller;
    a count that is neither moves it to superseded/counts/."""
    monkeypatch.setattr(compare, "RESULTS", tmp_path / "results")
    d = tmp_path / "results" / compare.PRESET / "v2" / "hetero"

    def run(*picked, host=(64, 64)):
        r = _result({"llm": _bits(1, 4), "slm1": _bits(1, 4)})
        r["rounds"] = [dict(r["rounds"][0], round=i + 1, selected={"down/slm1": k}, plugin={"down/slm1": {"H": h}})
                       for i, (k, h) in enumerate(zip(picked, host))]
        return r

    _write(d, "lada-s6", run(16, 9))
    _write(d, "lada-random-s6", run(16, 5, host=(64, 5)))  # round 2: its H_k held 5, fewer than lada's 9
    assert compare.supersede_random_of_other_counts(d, 6) is None
    _write(d, "lada-random-s6", run(16, 5, host=(64, 7)))  # 7 in H_k, yet only 5 taken: not lada's counts
    moved = compare.supersede_random_of_other_counts(d, 6)
    assert moved == tmp_path / "results" / compare.PRESET / "superseded" / "counts" / "hetero" / "lada-random-s6.json"
    assert not (d / "lada-random-s6.json").exists() and (d / "lada-s6.json").exists()



# -----------------------------------------------------------------------------
# LaDa v2 (docs/study-v2.md): v1's labels rerun as lada-v1*, gamma on validation, V1-V4 from files

def test_v1_labels_rerun_as_v1_methods_and_v2_runs_as_v2(tmp_path, monkeypatch):
    """The v1 study's files say lada, lada-filter, lada-loss: rerunning one passes --method lada-v1 etc.;
    a run under v2/ passes its own name."""
    seen = []
    monkeypatch.setattr(compare, "RESULTS", tmp_path / "results")

    def fake_main(args):
        seen.append(args[args.index("--method") + 1])
        out = Path(args[args.index("--out") + 1])
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps({"config": {"seed": 0}, "rounds": []}))
        return 0
    monkeypatch.setattr(compare.federated, "main", fake_main)
    res = compare.res_root()
    for label in ("lada", "lada-filter", "lada-loss", "fedmkt", "random"):
        compare.run_one("hetero", label, 0, [], res / "hetero" / f"{label}-s0.json", tmp_path / "w")
    for m in ("lada", "lada-sft"):
        compare.run_one("hetero", m, 6, [], res / "v2" / "hetero" / f"{m}-s6.json", tmp_path / "w")
    assert seen == ["lada-v1", "lada-v1-filter", "lada-v1-loss", "fedmkt", "random", "lada", "lada-sft"]
    assert all(m in methods.METHODS for m in seen)


def test_v2_gamma_is_chosen_on_validation_and_test_runs_follow_it(tmp_path, monkeypatch):
    monkeypatch.setattr(compare, "RESULTS", tmp_path)
    res = compare.res_root()
    assert [t[-1].name for t in compare.v2_tune_runs()] == ["lada-g0.1-s0.json", "lada-g0.3-s0.json", "lada-g1.0-s0.json"]
    assert all("--eval_split" in t[3] and t[3][t[3].index("--eval_split") + 1] == "val" for t in compare.v2_tune_runs())
    for g, k in ((0.1, 9), (0.3, 12)):
        _write(res / "v2" / "tune", f"lada-g{g}-s0", _result({"slm1": _bits(k, 50)}))
    assert compare.v2_gamma(res) is None  # a tuning run is missing
    _write(res / "v2" / "tune", "lada-g1.0-s0", _result({"slm1": _bits(12, 50)}))
    assert compare.v2_gamma(res) == 1.0  # 12 = 12: the tie goes to the larger gamma
    runs = list(compare.v2_runs(0.3))
    assert [(t[1], t[2]) for t in runs[:5]] == [(m, 6) for m in compare.V2_METHODS] and len(runs) == 15
    for _, m, seed, extra, dest in runs:
        assert extra[:4] == compare.V2_FLAGS and ("--gamma" in extra) == m.startswith("lada")
        if m == "lada-random":
            assert compare.counts_of(extra) == res / "v2" / "hetero" / f"lada-s{seed}.json"
    assert compare.main(["--v2", "--results", str(tmp_path / "none"), "--workdir", str(tmp_path / "w")]) == 2


def test_v2_hypotheses_from_files(tmp_path):
    """V1 (lada − fedmkt, SLMs) +10 points in every seed: supported; V2b, the LLM's public test −1 point
    (non-inferior at a −2 margin only if the interval's low end is above −2); V3 contradicted; V4 +5
    (lada-sft's files beside lada's, whose names share a prefix, are told apart); then without lada-sft,
    V4 not run, and without lada, a line saying so."""
    n = 100
    init = {"llm": _bits(50, n), "llm-private": _bits(5, n), "slm1": _bits(10, n)}
    for s in (6, 7, 8):
        for m, (llm, slm) in {"fedmkt": (50, 20), "lada": (49, 30), "lada-random": (50, 40), "lada-sft": (48, 25)}.items():
            _write(tmp_path / "v2" / "hetero", f"{m}-s{s}", _result({"llm": _bits(llm, n), "llm-private": _bits(5, n),
                                                                     "slm1": _bits(slm, n)}, init))
    text = compare.v2_tables(tmp_path)
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in text.splitlines()
            if line.startswith("| V")}
    assert rows["V1"][1].startswith("+10.0 [") and rows["V1"][3] == "supported"
    est, lo = rows["V2b"][1].split(" [")[0], float(rows["V2b"][1].split("[")[1].split(",")[0])
    assert est == "-1.0" and rows["V2b"][3] == ("supported" if lo > -2 else "not decided")
    assert rows["V2a"][1].startswith("+0.0") and rows["V2a"][3] == "not decided"
    assert rows["V3"][1].startswith("-10.0") and rows["V3"][3] == "contradicted"
    assert rows["V4"][1].startswith("+5.0 [") and rows["V4"][3] == "supported"
    assert "| lada | 49.0 ± 0.0 | 5.0 ± 0.0 | 30.0 ± 0.0 |" in text and "| lada-sft | 48.0 ± 0.0 |" in text
    for s in (6, 7, 8):
        (tmp_path / "v2" / "hetero" / f"lada-sft-s{s}.json").unlink()
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in compare.v2_tables(tmp_path).splitlines() if line.startswith("| V")}
    assert rows["V4"][3] == "not run" and rows["V1"][1].startswith("+10.0 [")
    for s in (6, 7, 8):
        (tmp_path / "v2" / "hetero" / f"lada-s{s}.json").unlink()
    text = compare.v2_tables(tmp_path)
    assert "| V" not in text and "V1–V4, hetero: not yet (no `lada` run)." in text
