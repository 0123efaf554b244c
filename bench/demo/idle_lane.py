"""Evaluations that run while training still does, in the lane training has left idle.

The training cells are dealt into the local lanes before they start (bench.launch.plan.assign_lanes)
and cannot be split, so the lanes end apart: on the full demo (9 cells in 2 lanes, 5 and 4) one
lane idles while the other trains its last cell (docs/demo.md has the measured runs), and the
evaluations waited for both. Here, while fewer lanes train than there are, a finished cell's next
evaluation job (one cell and sampling setting, as the eval stage submits it) runs in each idle
lane; the eval stage then skips it while it runs (bench.launch.plan.plan_eval) and deals the rest
over every lane.

One job at a time per idle lane keeps the lanes' work where the estimate puts it: a job started
just before training ends overlaps the eval stage for at most its own length, on a core training
has just freed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from bench.demo.local_jobs import children_stderr_to
from bench.launch.status import scheduler_states
from bench.launch.submit import submit_grid


@dataclass
class IdleLanes:
    """The evaluation jobs submitted while training runs."""

    lanes: int
    jobs: list = field(default_factory=list)  # {"executor", "job_id", "label", "evaluations"} per job
    submitted: set = field(default_factory=set)  # (cell name, setting) pairs

    def running(self) -> list[dict]:
        states = scheduler_states(self.jobs) if self.jobs else {}
        return [j for j in self.jobs if states.get(j["job_id"]) == "RUNNING"]

    @property
    def evaluations(self) -> int:
        return sum(j["evaluations"] for j in self.jobs)


def training_lanes_busy(rows: Sequence[dict]) -> int:
    """Lanes still training: the distinct jobs of the cells not done (a local lane is one job that
    trains its cells one after another; beyond the lanes, each cell is a job of its own)."""
    return len({r["job_id"] or r["cell"] for r in rows if r["state"] != "done"})


def fill_idle_lanes(idle: IdleLanes, plan, rows: Sequence[dict], pending: Callable[[], list[tuple]]) -> list[str]:
    """Submit one evaluation job per lane that is idle while training runs; returns the labels of
    the evaluation jobs now running. `pending()`: eval_todo's evaluations (read only when a lane is
    free, as reading every run's eval.jsonl costs CPU on every poll)."""
    busy = training_lanes_busy(rows)
    running = idle.running()
    if busy == 0 or busy + len(running) >= idle.lanes:
        return [j["label"] for j in running]
    done = {r["cell"] for r in rows if r["state"] == "done"}
    for cell, setting, _, _ in pending():
        if cell.name in done and (cell.name, setting) not in idle.submitted:
            idle.submitted.add((cell.name, setting))
            job = _submit(plan, cell, setting)
            if job is not None:
                idle.jobs.append(job)
                running.append(job)
                break
    return [j["label"] for j in running]


def _submit(plan, cell, setting: str) -> Optional[dict]:
    """The evaluation job of one finished cell and setting, as the eval stage would submit it."""
    with children_stderr_to(Path(plan.runs_root) / plan.grid / ".submitit" / "executors.log"):
        sub = submit_grid(plan.grid, "eval", local=True, overrides=plan.overrides, quiet=True,
                          only={(cell.name, setting)})
    if not sub.jobs or not sub.jobs[0].get("job_id"):
        return None  # nothing to evaluate after all (measured, or its job already runs)
    return {"executor": "local", "job_id": sub.jobs[0]["job_id"], "evaluations": len(sub.jobs[0]["steps"]),
            "label": f"{cell.cfg.spec} s{cell.cfg.train.seed} {setting}"}


def job_records(idle: Optional[IdleLanes]) -> list[dict]:
    """The scheduler records of the jobs submitted here (the eval stage waits for them too)."""
    return [{"executor": j["executor"], "job_id": j["job_id"]} for j in (idle.jobs if idle else [])]
