"""`bench grid` / `bench status`: submit a grid's cells with submitit and follow them.

Executors: `slurm` (AutoExecutor(cluster="slurm") with a profile of `slurm/profiles/`), `local`
(subprocesses that outlive the command; the cells run in `array_parallelism` lanes) and `debug`
(in-process, one cell after another). One submission per stage is ONE job array (`executor.batch()`).
Submission returns once the jobs are queued; nothing ever waits on a result.

Training jobs are `TrainJob`s (submitit `Checkpointable`): on preemption and on timeout (up to the
profile's `max_num_timeout`) submitit calls `checkpoint()`, which requeues the same job, and
`bench.train.loop.train` resumes from the newest checkpoint of the run folder. A job that the scheduler
requeues by itself (`scontrol requeue`) restarts the same pickle, with the same effect.

Every run folder keeps `jobs.jsonl`: a `submit` row per submission (stage, job and array id, log
paths, time, resources) written here, and `start` / `end` rows written by the job itself (outcome
done, failed with the error, or interrupted). `status` joins these with the scheduler (`squeue`, and
`sacct` for ended jobs where the cluster has accounting) and with the run folder (DONE, checkpoints,
metrics.jsonl, eval.jsonl).
Submitting again skips finished cells and cells whose job is queued or running; the eval stage
submits only the (checkpoint, setting) pairs that have no metric in eval.jsonl yet.

The work is split over the modules of bench/launch/: `profiles` (cluster profiles, resources,
errors), `jobs` (the jobs and the run-folder files), `executors` (submitit's executors), `status`
(job states, `bench status`), `plan` (what to submit, its cost, the local lanes) and `grids` (grid
files to cells); this file submits and holds the command line. Every public name of those modules
is importable from here.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Collection, Optional, Sequence

import submitit

from bench import resources
from bench.atomic import check_writable_dir

# Also re-exported: `from bench.launch.submit import X` works for every public name of bench/launch_*.py.
from bench.launch.executors import make_executor, scheduler_error
from bench.launch.grids import Cell, Grid, expand, load_grid, settings_for
from bench.launch.jobs import (
    Lane,
    append_record,
)
from bench.launch.plan import (
    PlannedJob,
    Submission,
    assign_lanes,
    estimate,
    format_submission,
    plan_eval,
    plan_train,
    work_units,
)
from bench.launch.profiles import (
    LaunchError,
    Profile,
    SchedulerError,
    job_resources,
    list_profiles,
    load_profile,
)
from bench.launch.status import format_status, grid_status
from bench.storage import checkpoint_bytes, checkpoints_held, estimate_parameters, preflight_warning, sample_bytes

STAGES = ("train", "eval")


# ----------------------------------------------------------------------------------------------
# Submitting: the executor, one job array per stage, debug runs in this process


def _run_debug(plan: Sequence[PlannedJob], handles: Sequence[Any], quiet: bool) -> list[str]:
    """Run debug jobs in this process, one after another; a failing cell does not stop the others."""
    failed = []
    for planned, handle in zip(plan, handles):
        previous = os.environ.get("SUBMITIT_DEBUG_JOB_ID")
        os.environ["SUBMITIT_DEBUG_JOB_ID"] = handle.job_id  # submitit.JobEnvironment() inside the job
        try:
            error = handle.exception()  # runs the job; unlike results(), never opens pdb on failure
        finally:
            if previous is None:
                os.environ.pop("SUBMITIT_DEBUG_JOB_ID", None)
            else:
                os.environ["SUBMITIT_DEBUG_JOB_ID"] = previous
        label = planned.cell.name + (f" [{planned.setting}]" if planned.setting else "")
        if error is not None:
            handle.paths.stderr.parent.mkdir(parents=True, exist_ok=True)
            handle.paths.stderr.write_text("".join(traceback.format_exception(error)))
            failed.append(label)
        if not quiet:
            print(f"debug: {label}: " + (f"FAILED ({type(error).__name__}: {error}); log {handle.paths.stderr}"
                                          if error is not None else "done"), flush=True)
    return failed


def disk_space_note(plan: Sequence[Any], stage: str, output_root: str) -> Optional[str]:
    """The free-space preflight of a submission (bench.storage): the checkpoints every planned
    training run holds at once, or the sample shards of every planned evaluation; torch-free, so
    the model's size comes from its configured size (within 1% of the built model at paper sizes)."""
    needed = 0
    for job in plan:
        cfg = job.cell.cfg
        if stage == "train":
            parameters = estimate_parameters(cfg.model, cfg.num_model_classes)
            needed += checkpoint_bytes(parameters) * checkpoints_held(cfg.train)
        else:
            needed += sample_bytes(job.job.cfg) * max(len(job.steps), 1)
    return preflight_warning(output_root, needed, f"the {len(plan)} {stage} job(s) of this submission")


def _check_where(stage: str, cluster: Optional[str], local: bool, debug: bool, dry_run: bool,
                 profiles_dir: Path | str | None) -> None:
    """One clear error for an unknown stage or for no (or more than one) place to run."""
    if stage not in STAGES:
        raise LaunchError(f"stage {stage!r} is not one of {list(STAGES)}")
    if sum((cluster is not None, bool(local), bool(debug))) > 1:
        raise LaunchError("choose one of --cluster PROFILE, --local or --debug")
    if cluster is None and not local and not debug and not dry_run:
        raise LaunchError("where should the jobs run? use --cluster PROFILE "
                          f"({', '.join(list_profiles(profiles_dir))}), "
                          "--local or --debug (or --dry-run to see the plan)")


def _add_estimates(out: Submission, plan: Sequence[PlannedJob], grid: Grid, profile: Optional[Profile],
                   perf_dir: Path | str) -> None:
    """Each job's cost, the submission's total, and a note for a job beyond the requeue budget."""
    for job in plan:
        job.estimate = estimate(job, out.resources, grid, profile, perf_dir)
        if profile and job.estimate.get("wall_h") and profile.executor == "slurm":
            budget = profile.time_min / 60 * (profile.max_num_timeout + 1)
            if job.estimate["wall_h"] > budget:
                out.notes.append(f"{job.cell.name}: ~{job.estimate['wall_h']:.0f} h exceeds the requeue budget of "
                                 f"{budget:.0f} h (time_min x (max_num_timeout + 1)); raise max_num_timeout")
    known = [j.estimate for j in plan if j.estimate.get("wall_h") is not None]
    out.estimate = {"gpu_h": sum(e["gpu_h"] for e in known), "wall_h": sum(e["wall_h"] for e in known),
                    "unknown": len([j for j in plan if j.job.stage == "train"]) - len(known)}


def _lanes(plan: Sequence[PlannedJob], kind: str, profile: Profile) -> tuple[list[Any], list[int]]:
    """What to submit (one job per cell, or for `local` beyond its parallelism, `Lane`s of cells
    balanced by their work) and, for each planned job, the index of what runs it."""
    if kind != "local" or len(plan) <= profile.array_parallelism:
        return [j.job for j in plan], list(range(len(plan)))
    groups = assign_lanes([work_units(j) for j in plan], profile.array_parallelism)  # no scheduler caps it
    lane_of = [0] * len(plan)
    for lane, group in enumerate(groups):
        for i in group:
            lane_of[i] = lane
    return [Lane([plan[i].job for i in group]) for group in groups], lane_of


def _submit_array(executor: submitit.AutoExecutor, lanes: Sequence[Any], kind: str, grid: Grid,
                  profile: Profile) -> list[Any]:
    """One job array of `lanes`; a failed sbatch is one SchedulerError line."""
    try:
        with executor.batch():  # sbatch runs when the block ends
            handles = [executor.submit(fn) for fn in lanes]
    except SchedulerError:
        raise
    except Exception as err:
        if kind != "slurm":
            raise
        raise scheduler_error(f"could not submit grid {grid.name}", profile, err) from None
    return handles


def _record_submissions(out: Submission, plan: Sequence[PlannedJob], handles: Sequence[Any],
                        lane_of: Sequence[int], lanes_used: int, profile: Profile) -> None:
    """A `submit` row in every planned run folder's jobs.jsonl, and the job id and log in `out.jobs`."""
    for index, job in enumerate(plan):
        handle = handles[lane_of[index]]
        array_id, _, array_index = handle.job_id.partition("_")
        record = {"event": "submit", "stage": out.stage, "cell": job.cell.name, "grid": out.grid,
                  "executor": out.executor, "profile": profile.name, "job_id": handle.job_id,
                  "array_id": array_id, "array_index": int(array_index) if array_index.isdigit() else None,
                  "lane": lane_of[index] if lanes_used < len(plan) else None,
                  "stdout": str(handle.paths.stdout), "stderr": str(handle.paths.stderr),
                  "submitit_folder": str(handle.paths.folder), "resources": out.resources,
                  "overrides": list(job.cell.overrides)}
        if job.setting is not None:
            record.update(setting=job.setting, steps=list(job.steps))
        append_record(job.run_dir, record)
        out.jobs[index].update(job_id=handle.job_id, log=record["stdout"])


def submit_grid(name: str, stage: str = "train", cluster: Optional[str] = None, local: bool = False,
                debug: bool = False, dry_run: bool = False, job_fn: Optional[Callable] = None,
                overrides: Sequence[str] = (), quiet: bool = False, grids_dir: Path | str | None = None,
                profiles_dir: Path | str | None = None, perf_dir: Path | str = "results/perf",
                only: Optional[Collection[tuple[str, Optional[str]]]] = None) -> Submission:
    """Submit the cells of grid `name` for `stage` as one job array; return without waiting.

    cluster: a profile of slurm/profiles/ (its `executor` says slurm or local); local: the `local`
    profile; debug: in-process, now (with the `local` profile's resources). job_fn replaces
    bench.train.loop.train (train: fn(cfg, run_dir)) or bench.evaluate.score_run.evaluate (eval: fn(cfg, run_dir,
    steps=[...], setting=NAME)); it must be picklable for slurm/local. overrides go to every cell
    (e.g. output_root=..., data.prepared_dir=...). dry_run prints the jobs, their resources and
    GPU-hours and submits nothing. only: the (cell name, eval setting or None) pairs to submit of
    what the stage would submit (`bench demo` evaluates finished cells while others still train).
    """
    _check_where(stage, cluster, local, debug, dry_run, profiles_dir)
    grid = load_grid(name, grids_dir)
    profile = load_profile(cluster, profiles_dir) if cluster else (
        load_profile("local", profiles_dir) if (local or debug) else None)
    kind = "debug" if debug else (profile.executor if profile else None)
    cells = expand(grid, overrides)
    out = Submission(grid.name, stage, kind, profile.name if profile else None, {}, [], [], dry_run)
    plan, out.skipped = (plan_train if stage == "train" else plan_eval)(grid, cells, job_fn)
    if only is not None:
        plan = [job for job in plan if (job.cell.name, job.setting) in only]
    out.resources = res = job_resources(grid, profile, stage)
    _add_estimates(out, plan, grid, profile, perf_dir)
    out.notes += [f"also measure: {command}" for command in grid.perf]
    if plan:
        out.notes += [note for note in [disk_space_note(plan, stage, cells[0].cfg.output_root)] if note]
    out.jobs = [{"cell": j.cell.name, "setting": j.setting, "steps": list(j.steps), "run_dir": str(j.run_dir),
                 **{k: j.estimate.get(k) for k in ("throughput", "source", "wall_h", "gpu_h")}} for j in plan]
    if dry_run and profile is None:
        out.notes.append(f"no --cluster given: resources are the grid's own and no profile's; add --cluster "
                         f"PROFILE ({', '.join(list_profiles(profiles_dir))}) to plan for that cluster. Costs "
                         "need a training throughput: `bench perf` on the target machine (rows in "
                         f"{perf_dir}) or `throughput` in the grid or the profile")
    if not plan and not dry_run:
        out.notes.append("nothing to submit")
    if dry_run or not plan:
        if not quiet:
            print(format_submission(out))
        return out
    assert profile is not None and kind is not None
    check_writable_dir(cells[0].cfg.output_root, "output_root=")  # one line now, not a traceback later
    folder = Path(cells[0].cfg.output_root).resolve() / grid.name / ".submitit" / stage / "%j"
    executor = make_executor(kind, folder, profile, res, f"{grid.name}-{stage}")
    if kind == "local":
        for job in plan:
            job.job.threads = res["cpus_per_task"]
    lanes, lane_of = _lanes(plan, kind, profile)
    handles = _submit_array(executor, lanes, kind, grid, profile)
    _record_submissions(out, plan, handles, lane_of, len(lanes), profile)
    if kind == "debug":
        out.failed = _run_debug(plan, handles, quiet)
    if not quiet:
        print(format_submission(out))
    return out


# ----------------------------------------------------------------------------------------------
# Command line (wired into bench/cli.py as `bench grid` and `bench status`)


def add_grid_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of `bench grid`."""
    parser.add_argument("name", nargs="?", help="grid name (ablations/grids/NAME.yaml); --list shows them")
    parser.add_argument("overrides", nargs="*", help="key=value for every cell (e.g. output_root=/shared/runs)")
    parser.add_argument("--stage", choices=STAGES, default="train")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--cluster", metavar="PROFILE", help="a profile of slurm/profiles/ (e.g. example, local-slurm)")
    where.add_argument("--local", action="store_true", help="subprocesses on this machine (profile local)")
    where.add_argument("--debug", action="store_true", help="in this process, one cell after another")
    parser.add_argument("--dry-run", action="store_true", help="print the jobs, resources and GPU-hours only")
    parser.add_argument("--list", action="store_true",
                        help="with NAME: the grid's cells; without: the grids and cluster profiles")
    return parser


def _parse(argv: Any, parser: argparse.ArgumentParser) -> argparse.Namespace:
    # Intermixed: `bench grid NAME --local output_root=...` (overrides after the options) works too.
    return argv if isinstance(argv, argparse.Namespace) else parser.parse_intermixed_args(list(argv))


def format_cells(grid: Grid, cells: Sequence[Cell]) -> str:
    """`bench grid NAME --list`: every cell with its run folder, its own overrides (those beyond
    the grid's `base`), the checkpoints the eval stage scores and its evaluation settings."""
    lines = [f"grid {grid.name}: {grid.title} ({len(cells)} cells)", f"  base: {' '.join(grid.base) or '-'}"]
    for cell in cells:
        own = [o for o in cell.overrides if o not in grid.base and not o.startswith(("grid=", "train.milestones="))]
        settings = ", ".join(s.name + (f" (steps {list(s.steps)} only)" if s.steps else "")
                             for s in settings_for(grid, cell))
        lines.append(f"  {cell.name}  {cell.run_dir}\n    overrides: {' '.join(own) or '-'}\n"
                     f"    eval steps: {list(cell.eval_steps) or 'every checkpoint'}; settings: {settings}")
    return "\n".join(lines)


def format_catalogue() -> str:
    """`bench grid --list`: every grid and cluster profile, and where each was found (a user
    folder on the search path, or what ships: bench.resources)."""
    grids, profiles = resources.items("grids"), resources.items("profiles")
    lines = [f"{name:22s} {load_grid(name).title}" + ("" if item.origin == resources.SHIPPED
                                                      else f"  [{resources.describe_origin(item)}]")
             for name, item in grids.items()]
    lines.append("profiles: " + ", ".join(name + ("" if item.origin == resources.SHIPPED
                                                  else f" [{resources.describe_origin(item)}]")
                                          for name, item in profiles.items()))
    folders = resources.user_folders()
    lines.append("search path: " + ", ".join([*map(str, folders), "shipped"]) +
                 f" (${resources.SEARCH_ENV}, then ./{resources.LOCAL_FOLDER}/, then what ships)")
    return "\n".join(lines)


def main_grid(argv: Any = None) -> int:
    """`bench grid NAME [overrides] [--stage train|eval] [--cluster P | --local | --debug] [--dry-run] [--list]`."""
    args = _parse(sys.argv[1:] if argv is None else argv, add_grid_arguments(
        argparse.ArgumentParser(prog="bench grid", description="Submit an ablation grid (returns at once).")))
    if args.list and args.name:
        grid = load_grid(args.name)
        print(format_cells(grid, expand(grid, args.overrides)))
        return 0
    if args.list or not args.name:
        print(format_catalogue())
        return 0 if args.list else 2
    sub = submit_grid(args.name, args.stage, cluster=args.cluster, local=args.local, debug=args.debug,
                      dry_run=args.dry_run, overrides=args.overrides)
    return 1 if sub.failed else 0


def main_status(argv: Any = None) -> int:
    """`bench status NAME [overrides]`: the state of every cell of a grid."""
    parser = argparse.ArgumentParser(prog="bench status", description="State of every cell of a grid.")
    parser.add_argument("name", nargs="?", help="a grid (not with --prepare)")
    parser.add_argument("overrides", nargs="*", help="the key=value given to `bench grid` (e.g. output_root=...)")
    parser.add_argument("--json", action="store_true", help="one JSON object per cell")
    parser.add_argument("--prepare", action="store_true",
                        help="the jobs of `bench prepare --cluster` for the prepared folder the key=value name")
    args = _parse(sys.argv[1:] if argv is None else argv, parser)
    from bench.launch import prepare_jobs

    if args.prepare:  # every positional is a key=value here
        print(prepare_jobs.main_status_prepare([a for a in [args.name, *args.overrides] if a], args.json))
        return 0
    if not args.name:
        parser.error("name a grid (bench grid --list), or pass --prepare")
    rows = grid_status(args.name, args.overrides)
    print("\n".join(json.dumps(r) for r in rows) if args.json else format_status(args.name, rows))
    if not args.json:  # the grid's prepared folder, when `bench prepare --cluster` made it
        for folder in sorted({str(Path(c.cfg.data.prepared_dir).resolve()) for c in expand(args.name, args.overrides)}):
            if (Path(folder) / prepare_jobs.JOBS_FILE).is_file():
                print(prepare_jobs.format_prepare_status(prepare_jobs.prepare_status(folder)))
    return 0
