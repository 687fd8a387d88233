"""make.py: the shipped bases, the warmed-up parties a first run starts from (models.BASES).

    python bases/make.py      # about 17 minutes (one thread)

Warms up the parties of `python federated.py --scenario hetero` on the CPU preset (seed 0) with the
project's own warm-up (distill.warm_up, exactly as a run without a base would), in a scratch cache,
then puts each entry here under the name a run looks it up by (party and the hash of everything that
determines it: zoo entry, tokenizer, data, warm-up, seed). Each entry is the warm-up cache's layout
(safetensors, tokenizer, info.json) plus manifest.json (the SHA-256 of every file). info.json records
the warm-up's losses (its first steps and its last 20), and `made`: library versions, threads, CPU,
commit and date. Entries of earlier bases are removed. tests/test_bases.py checks that the entries
load, that their names are the keys the preset computes today, and that a short re-run of each
warm-up reproduces the recorded losses.

A warm-up is bit-reproducible on one machine kind at one thread count only (GPT-2's differs between
one and two threads), so the bases are made at one thread.
"""
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import transformers

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the project's modules, when run as `python bases/make.py`
import config  # noqa: E402
import parties  # noqa: E402
from models import BASES  # noqa: E402
from store import write_manifest  # noqa: E402

FLAGS = ["--scenario", "hetero", "--preset", "cpu", "--device", "cpu", "--seed", "0", "--rewarm"]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def commit() -> str:
    """HEAD, and whether tracked files differ from it."""
    git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    try:
        return git("rev-parse", "--short", "HEAD") + (" with uncommitted changes" if git("status", "--porcelain", "-uno") else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main():
    torch.set_num_threads(1)  # one thread: a re-run at one thread reproduces the warm-ups bit for bit (same CPU kind)
    made = dict(command="python bases/make.py", flags=" ".join(FLAGS), torch=torch.__version__,
                transformers=transformers.__version__, threads=1, cpu=cpu_name(),
                commit=commit(), date=datetime.date.today().isoformat())
    with tempfile.TemporaryDirectory() as scratch:
        cfg, _ = config.config_from_flags(FLAGS + ["--cache", scratch])
        jobs = parties.warm_jobs(cfg, parties.make_data(cfg, parties.n_clients(cfg)))
        for name, (path, job) in jobs.items():
            parties.warm_party(path, *job)
        for old in BASES.glob("*-*"):
            if old.is_dir():
                shutil.rmtree(old)
        print(f"{'party':6} {'entry':24} {'params':>8} {'warm-up':>8} {'loss':>7} {'MB':>5}")
        for name, (path, _) in jobs.items():
            dest = BASES / path.name
            shutil.copytree(path, dest)  # a fresh entry: no evaluation kept beside it yet
            info = json.loads((dest / "info.json").read_text())
            (dest / "info.json").write_text(json.dumps(dict(info, made=made), indent=1))
            write_manifest(dest)
            mb = sum(f.stat().st_size for f in dest.rglob("*")) / 2**20
            print(f"{name:6} {path.name:24} {info['params']:>8} {info['warm_seconds']:>7.1f}s {info['warm_loss']:>7.4f} {mb:>5.2f}")
    print(f"made at {made['threads']} thread(s) on {made['cpu']}, torch {made['torch']}, commit {made['commit']}")


if __name__ == "__main__":
    os.chdir(ROOT)
    main()
