"""Run an embedded grid on this machine from nothing: prepare the embedded default exactly as
`bench demo` does (the local profile's lanes), train the grid's cells in the local executor's lanes,
then score them. Resumable: running the same command again reuses the prepared data, skips finished
cells, resumes killed ones from their checkpoints and scores only what has no metric yet.

    PYTHONPATH=$PWD HF_HUB_OFFLINE=1 python results/studies/embedded/confirm/run_confirm.py ROOT [GRID]

ROOT (absolute) receives prepared/ and runs/; GRID defaults to `embedded_confirm`, the grid this
runner was written for; one line per stage and poll goes to stdout.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from bench.demo.plan import eval_todo, make_plan
from bench.demo.run import first_failure
from bench.launch.grids import expand, load_grid
from bench.launch.submit import grid_status, submit_grid
from bench.prepare.pipeline import prepare_embedded

POLL_S = 60


def say(text: str) -> None:
    print(f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} {text}", flush=True)


def wait_train(grid, overrides) -> None:
    while True:
        rows = grid_status(grid, overrides)
        error = first_failure(rows, "train")
        if error:
            raise SystemExit(error)
        done = sum(r["state"] == "done" for r in rows)
        say(f"train {done}/{len(rows)} done; " + ", ".join(f"{r['cell']} {r['step'] or 0}" for r in rows
                                                           if r["state"] == "running"))
        if done == len(rows):
            return
        time.sleep(POLL_S)


def wait_eval(grid, cells, overrides) -> None:
    while True:
        error = first_failure(grid_status(grid, overrides), "eval")
        if error:
            raise SystemExit(error)
        todo = eval_todo(grid, cells)
        say(f"eval: {len(todo)} evaluations left")
        if not todo:
            return
        time.sleep(POLL_S)


def main(root: Path, name: str) -> None:
    plan = make_plan(False, str(root / "demo-unused"), str(root / "runs"), str(root / "prepared"),
                     progress=False, calibrate=False)
    say(f"prepare -> {plan.prepared_dir}")
    prepare_embedded(plan.prepared_dir, plan.data_name, plan.prepare, pca_rank_max=16)
    grid = load_grid(name)
    cells = expand(grid, plan.overrides)
    say("train: submitting (finished cells are skipped)")
    submit_grid(name, "train", local=True, overrides=plan.overrides)
    wait_train(grid, plan.overrides)
    if eval_todo(grid, cells):
        say("eval: submitting")
        submit_grid(name, "eval", local=True, overrides=plan.overrides)
    wait_eval(grid, cells, plan.overrides)
    say("done")


if __name__ == "__main__":
    main(Path(sys.argv[1]).resolve(), sys.argv[2] if len(sys.argv) > 2 else "embedded_confirm")
