"""Two-rank torchrun training (tests/test_ddp.py's tiny run, 2 steps) again and again, alternating two
checkouts of redi-bench, counting the runs whose rank aborted ("terminate called") or failed.

    python stress.py OUT RUNS --base OLD_CHECKOUT --new NEW_CHECKOUT   # start three at once on 2 cores

One line per run (index, arm, exit code, seconds, ABORT/FAIL); a failed run's output goes to
OUT/fail<i>.txt. The tiny data and config come from the NEW checkout's test fixtures.
"""
import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

parser = argparse.ArgumentParser()
parser.add_argument("out")
parser.add_argument("runs", type=int)
parser.add_argument("--base", required=True)
parser.add_argument("--new", required=True)
args = parser.parse_args()
root, new = Path(args.out).resolve(), Path(args.new).resolve()
sys.path[:0] = [str(new / "tests"), str(new)]
from fixtures_train import tiny_config, write_prepared  # noqa: E402

from bench.compose import dumps  # noqa: E402

root.mkdir(parents=True, exist_ok=True)
data = root / "data" if (root / "data").exists() else write_prepared(root / "data")
cfg = tiny_config(data, root / "runs", "train.max_steps=2", "train.ckpt_every=2", spec="redi_repa")
(root / "config.json").write_text(dumps(cfg))
env = dict(os.environ, PYTHONFAULTHANDLER="1", OMP_NUM_THREADS="1")
for i in range(args.runs):
    arm = "new" if i % 2 else "base"
    env["PYTHONPATH"] = str(new if arm == "new" else Path(args.base).resolve())
    start = time.time()
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "bench.train.loop", "--config", str(root / "config.json"), "--run-dir",
                        str(root / f"run{i}")], cwd=root, env=env, capture_output=True, text=True, timeout=400)
    bad = "terminate called" in r.stderr or r.returncode != 0
    verdict = ("ABORT" if "terminate called" in r.stderr else "FAIL") if bad else ""
    print(i, arm, r.returncode, f"{time.time() - start:.1f}s", verdict, flush=True)
    if bad:
        (root / f"fail{i}.txt").write_text(r.stdout + "\n----\n" + r.stderr)
