"""What a submission of `bench grid` would run and what it costs, and its printed summary.

Planning skips finished cells, cells whose job is queued or running, and (eval stage) the
(checkpoint, setting) pairs that eval.jsonl already covers. The cost is steps x batch / throughput,
the throughput measured by `bench perf` or stated by the grid or the cluster profile.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from bench.config import ExperimentConfig
from bench.launch.grids import Cell, Grid
from bench.launch.jobs import CellJob, EvalJob, TrainJob, measured_steps
from bench.launch.profiles import LaunchError, Profile
from bench.launch.status import eval_pairs, job_state, last_submit, scheduler_states
from bench.runfolder import DONE_FILE, JOBS_FILE, checkpoint_steps, read_jsonl


@dataclass
class PlannedJob:
    """One cell (and, for eval, one setting and its steps) to submit."""

    cell: Cell
    run_dir: Path
    job: CellJob
    setting: Optional[str] = None
    steps: tuple[int, ...] = ()
    estimate: dict = field(default_factory=dict)


# What an evaluation does besides sampling (decode, score, its start), per sample, in network
# evaluations of one image: on the embedded demo (a 2-vCPU Xeon, both lanes busy) decoding and
# scoring took 6.7-8.6 ms a sample and the start ~3 ms, against ~2 ms per network evaluation. Without
# it a job of two unguided checkpoints weighs as much as one of a single guided checkpoint, though
# it runs ~10% longer, and all the guided jobs went to one lane.
FINISH_UNITS_PER_SAMPLE = 4.0


def work_units(job: "PlannedJob") -> float:
    """A job's relative cost, to balance local lanes: training images still to see, or network
    evaluations of an evaluation job (checkpoints x samples x (solver steps x guidance passes +
    FINISH_UNITS_PER_SAMPLE))."""
    cfg = job.job.cfg
    if job.setting is None:
        return float(cfg.train.max_steps * cfg.train.batch_size)
    g = cfg.eval.guidance
    passes = 1 + (g.cfg_scale != 1.0) + (g.rg_scale != 1.0)
    per_sample = cfg.eval.num_sampling_steps * passes + FINISH_UNITS_PER_SAMPLE
    return float(len(job.steps) * cfg.eval.num_samples * per_sample)


def assign_lanes(costs: list[float], lanes: int) -> list[list[int]]:
    """Job indices per lane: longest first, each to the lane with the least work so far (ties to
    the lower lane), each lane in submission order. Round-robin put both guided evaluations of the
    demo in one lane, which then ran 4 min after the other had finished."""
    count = max(1, min(lanes, len(costs)))
    loads, out = [0.0] * count, [[] for _ in range(count)]
    for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        lane = min(range(count), key=lambda k: (loads[k], k))
        loads[lane] += costs[index]
        out[lane].append(index)
    return [sorted(lane) for lane in out]


@dataclass
class Submission:
    """What `submit_grid` did (or, for a dry run, would do)."""

    grid: str
    stage: str
    executor: Optional[str]
    profile: Optional[str]
    resources: dict
    jobs: list[dict]
    skipped: list[dict]
    dry_run: bool = False
    notes: list[str] = field(default_factory=list)
    estimate: dict = field(default_factory=dict)
    failed: list[str] = field(default_factory=list)

    @property
    def submitted(self) -> int:
        return 0 if self.dry_run else len(self.jobs)


def _size_label(cfg: ExperimentConfig) -> str:
    m = cfg.model  # the label bench perf writes in its rows (model_size)
    return m.size if m.size != "custom" else f"custom:{m.depth},{m.hidden_size},{m.num_heads},{m.patch_size}"


def find_throughput(cfg: ExperimentConfig, device: str, grid: Grid, profile: Optional[Profile],
                    perf_dir: Path | str = "results/perf") -> tuple[Optional[float], str]:
    """Training images/s per device: a measured `bench perf` row, else the grid's or profile's number."""
    spec = cfg.spec + ("_separate" if cfg.model.fusion == "separate" else "")
    best = None
    for path in sorted(Path(perf_dir).glob("*.jsonl")):
        for row in read_jsonl(path):
            if (row.get("kind") == "train" and row.get("mode", "default") == "default" and row.get("spec") == spec
                    and row.get("model_size") == _size_label(cfg) and str(row.get("device", "")).startswith(device)
                    and isinstance(row.get("images_per_s"), (int, float)) and row["images_per_s"] > 0
                    and (best is None or str(row.get("created_at", "")) >= str(best[0].get("created_at", "")))):
                best = (row, path)
    if best is not None:
        return float(best[0]["images_per_s"]), f"measured ({best[1].name})"
    for where, table in (("grid", grid.throughput), ("profile", profile.throughput if profile else {})):
        value = table.get(cfg.model.size)
        if value:
            factor = 0.5 if cfg.model.fusion == "separate" else 1.0  # 2L tokens: ~half (paper Table 6)
            return float(value) * factor, f"{where} setting" + (" x0.5 (separate tokens)" if factor != 1 else "")
    return None, "unknown (run `bench perf` or set `throughput` in the grid or profile)"


def estimate(job: PlannedJob, res: dict, grid: Grid, profile: Optional[Profile], perf_dir: Path | str) -> dict:
    """steps x batch / throughput: wall-hours of the job and its GPU-hours (GPUs x wall-hours)."""
    if job.job.stage != "train":
        return {"throughput": None, "source": "n/a (evaluation)", "wall_h": None, "gpu_h": None}
    gpus = res["gpus_per_node"] * res["nodes"]
    device = "cuda" if gpus else "cpu"
    throughput, source = find_throughput(job.cell.cfg, device, grid, profile, perf_dir)
    remaining = job.cell.cfg.train.max_steps - max(checkpoint_steps(job.run_dir), default=0)
    if throughput is None:
        return {"throughput": None, "source": source, "wall_h": None, "gpu_h": None, "steps": remaining}
    wall = remaining * job.cell.cfg.train.batch_size / (throughput * max(gpus, 1)) / 3600
    return {"throughput": throughput, "source": source, "wall_h": wall, "gpu_h": wall * gpus, "steps": remaining}


def plan_train(grid: Grid, cells: Sequence[Cell], job_fn: Optional[Callable]) -> tuple[list[PlannedJob], list[dict]]:
    plan, skipped, pending = [], [], []
    for cell in cells:
        run = Path(cell.run_dir).resolve()
        if (run / DONE_FILE).is_file():
            skipped.append({"cell": cell.name, "reason": "done"})
            continue
        sub, events = last_submit(read_jsonl(run / JOBS_FILE), "train")
        pending.append((cell, run, sub, events))
    states = scheduler_states([sub for _, _, sub, _ in pending if sub])
    for cell, run, sub, events in pending:
        if sub is not None:
            st, detail, _ = job_state(sub, events, states)
            if st in ("queued", "running", "unknown"):
                why = f"already {st} (job {sub['job_id']})" + (f": {detail}" if detail else "")
                skipped.append({"cell": cell.name, "reason": why})
                continue
        plan.append(PlannedJob(cell, run, TrainJob(grid.name, cell.name, cell.cfg, str(run), job_fn)))
    return plan, skipped


def plan_eval(grid: Grid, cells: Sequence[Cell], job_fn: Optional[Callable]) -> tuple[list[PlannedJob], list[dict]]:
    plan, skipped, pending = [], [], []
    for cell in cells:
        run = Path(cell.run_dir).resolve()
        ready = set(checkpoint_steps(run))
        records = read_jsonl(run / JOBS_FILE)
        for setting, cfg, steps in eval_pairs(grid, cell, run):
            tag = {"cell": cell.name, "setting": setting.name}
            try:
                measured = measured_steps(cfg, run, steps, setting.name)
            except ValueError as err:  # bench.evaluate.score_run's EvaluationError: metrics it cannot compute
                raise LaunchError(f"grid {grid.name}, cell {cell.name}, eval setting {setting.name}: {err}") from None
            missing = [s for s in steps if s not in measured]
            todo = [s for s in missing if s in ready]
            if not steps or (missing and not todo):
                skipped.append({**tag, "reason": f"waiting for checkpoints {missing or 'of training'}"})
            elif not missing:
                skipped.append({**tag, "reason": "measured"})
            else:
                pending.append((cell, run, setting, cfg, todo, *last_submit(records, "eval", setting.name)))
    states = scheduler_states([p[5] for p in pending if p[5]])
    for cell, run, setting, cfg, todo, sub, events in pending:
        if sub is not None:
            st, detail, _ = job_state(sub, events, states)
            if st in ("queued", "running", "unknown"):
                skipped.append({"cell": cell.name, "setting": setting.name,
                                "reason": f"already {st} (job {sub['job_id']})" + (f": {detail}" if detail else "")})
                continue
        job = EvalJob(grid.name, cell.name, cfg, str(run), job_fn, setting=setting.name, steps=todo)
        plan.append(PlannedJob(cell, run, job, setting.name, tuple(todo)))
    return plan, skipped


# ----------------------------------------------------------------------------------------------
# What was (or would be) submitted, as printed


def _hours(h: float) -> str:
    return "0 h" if h == 0 else f"{h:,.0f} h" if h >= 10 else f"{h:.2f} h" if h >= 0.01 else f"{h * 3600:.1f} s"


def format_submission(sub: Submission) -> str:
    """What was (or, with --dry-run, would be) submitted, the skipped cells, resources and cost."""
    where = (sub.executor or "no executor (no --cluster given)") + (f" (profile {sub.profile})" if sub.profile else "")
    verb = "would submit" if sub.dry_run else "submitted"
    lines = [f"grid {sub.grid}, stage {sub.stage}: {verb} {len(sub.jobs)} job(s) to {where}"
             + (" as one array" if len(sub.jobs) > 1 and not sub.dry_run else "")]
    if sub.resources:
        r = sub.resources
        lines.append(f"  per job: {r['nodes']} node(s) x {r['gpus_per_node']} GPU(s), "
                     f"{r['tasks_per_node']} task(s)/node, {r['cpus_per_task']} CPU(s)/task, "
                     f"mem {r['mem_gb'] or 'default'} GB, time limit {r['timeout_min']} min")
    for j in sub.jobs:
        what = j["cell"] + (f" [{j['setting']}] steps {j['steps']}" if j.get("setting") else "")
        cost = (f"{j['throughput']:g} img/s ({j['source']}): {_hours(j['wall_h'])} wall, {_hours(j['gpu_h'])} GPU"
                if j.get("wall_h") is not None else f"cost {j.get('source')}")
        lines.append(f"  {what}: " + (f"job {j['job_id']}, " if j.get("job_id") else "") + cost)
    for s in sub.skipped:
        lines.append(f"  skip {s['cell']}" + (f" [{s['setting']}]" if s.get("setting") else "") + f": {s['reason']}")
    if sub.estimate and sub.jobs and sub.stage == "train" and sub.estimate["unknown"] == len(sub.jobs):
        lines.append("  estimate: unknown, no job has a throughput figure (run `bench perf` on the target "
                     "machine, or set `throughput` in the grid or the profile)")
    elif sub.estimate and sub.jobs and sub.stage == "train":
        e = sub.estimate
        lines.append(f"  estimate: {_hours(e['gpu_h'])} GPU (GPUs x wall time), {_hours(e['wall_h'])} of job wall time"
                     + (f" ({e['unknown']} job(s) without a throughput figure)" if e["unknown"] else ""))
    lines += [f"  note: {n}" for n in sub.notes]
    lines += [f"  FAILED: {f}" for f in sub.failed]
    return "\n".join(lines)
