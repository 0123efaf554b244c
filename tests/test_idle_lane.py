"""bench.demo.idle_lane: while some lanes still train, each idle lane evaluates one finished cell's
job at a time, never a cell that still trains, and never the same (cell, setting) twice."""

from __future__ import annotations

from types import SimpleNamespace

from bench.demo import idle_lane
from bench.demo.idle_lane import IdleLanes, fill_idle_lanes, job_records, training_lanes_busy


def _cell(name: str, spec: str = "repa", seed: int = 0):
    return SimpleNamespace(name=name, cfg=SimpleNamespace(spec=spec, train=SimpleNamespace(seed=seed)))


def _row(cell: str, state: str, job: str) -> dict:
    return {"cell": cell, "state": state, "job_id": job}


def test_idle_lanes_evaluate_finished_cells_one_job_at_a_time(monkeypatch, tmp_path):
    submitted, alive = [], set()

    def submit_grid(grid, stage, local, overrides, quiet, only):
        (pair,) = only
        submitted.append((stage, pair))
        job_id = f"e{len(submitted)}"
        alive.add(job_id)
        return SimpleNamespace(jobs=[{"job_id": job_id, "steps": [100, 200]}])

    monkeypatch.setattr(idle_lane, "submit_grid", submit_grid)
    monkeypatch.setattr(idle_lane, "scheduler_states",
                        lambda jobs: {j["job_id"]: "RUNNING" if j["job_id"] in alive else "GONE" for j in jobs})
    plan = SimpleNamespace(runs_root=tmp_path, grid="demo", overrides=[])
    a, b, c = _cell("a"), _cell("b", "redi_rg", 1), _cell("c")
    todo = [(c, "default", None, 100), (b, "default", None, 100), (b, "rg1.5", None, 200), (a, "default", None, 200)]
    reads = []

    def pending():
        reads.append(1)
        return todo

    idle = IdleLanes(lanes=2)
    both_train = [_row("a", "done", "L0"), _row("b", "running", "L0"), _row("c", "running", "L1")]
    assert training_lanes_busy(both_train) == 2
    assert fill_idle_lanes(idle, plan, both_train, pending) == [] and not submitted and not reads

    # Lane L0 is done and L1 still trains c: the first finished cell's job in todo order, not c's.
    one_trains = [_row("a", "done", "L0"), _row("b", "done", "L0"), _row("c", "running", "L1")]
    assert fill_idle_lanes(idle, plan, one_trains, pending) == ["redi_rg s1 default"]
    assert submitted == [("eval", ("b", "default"))]
    assert fill_idle_lanes(idle, plan, one_trains, pending) == ["redi_rg s1 default"]  # still running
    assert len(submitted) == 1 and len(reads) == 1
    alive.clear()  # it ended: the next job of a finished cell
    assert fill_idle_lanes(idle, plan, one_trains, pending) == ["redi_rg s1 rg1.5"]
    assert submitted[-1] == ("eval", ("b", "rg1.5")) and idle.evaluations == 4
    assert job_records(idle) == [{"executor": "local", "job_id": "e1"}, {"executor": "local", "job_id": "e2"}]

    # Training over: the eval stage takes the rest.
    all_done = [_row(r["cell"], "done", r["job_id"]) for r in one_trains]
    assert fill_idle_lanes(idle, plan, all_done, pending) == ["redi_rg s1 rg1.5"] and len(submitted) == 2


def test_a_job_the_eval_stage_would_not_submit_is_not_counted(monkeypatch, tmp_path):
    monkeypatch.setattr(idle_lane, "submit_grid", lambda *args, **kwargs: SimpleNamespace(jobs=[]))
    monkeypatch.setattr(idle_lane, "scheduler_states", lambda jobs: {})
    plan = SimpleNamespace(runs_root=tmp_path, grid="demo", overrides=[])
    a = _cell("a")
    idle = IdleLanes(lanes=2)
    rows = [_row("a", "done", "L0"), _row("b", "running", "L1")]
    assert fill_idle_lanes(idle, plan, rows, lambda: [(a, "default", None, 100)]) == []
    assert idle.jobs == [] and idle.evaluations == 0 and idle.submitted == {("a", "default")}
