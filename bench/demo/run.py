"""`bench demo [--quick]`: the paper's central comparison (Table 1 in miniature) on this machine.

The same machinery as a cluster run, end to end, offline, on CPU:

    measure   ~30 s: this machine's units of work timed (bench.demo.calibrate), every stage
              estimated and printed before any work starts;
    prepare   the embedded default (bench.prepare.pipeline.prepare_embedded), cached by content hash;
              the VAE and the classifier train side by side, the images are encoded in lanes;
    train     grid `demo` (or `demo_quick`) through bench.launch.submit.submit_grid with the local
              executor (the local profile's lanes: two one-thread jobs at a time), followed here with
              a progress line;
    eval      the same grid's eval stage (plain sampling for every cell, plus Representation
              Guidance for redi_rg), followed the same way;
    report    bench.report.summary into OUT/report, then OUT/summary.md (means with 95% intervals over
              the paired seeds, paired differences), a combined convergence figure and one sample
              figure per spec (bench.demo.output).
The plan, the estimates and the progress line are bench.demo.plan's; this file runs the stages.

Re-running reuses everything finished: prepare returns at once, the launcher skips finished cells
and measured evaluations, and only the report is written again. The demo owns its local jobs
(bench.demo.local_jobs): they end however the demo ends, and the next run resumes from their
checkpoints.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional, Sequence

from bench import runfolder
from bench.atomic import check_writable_dir
from bench.demo.calibrate import Estimate
from bench.demo.idle_lane import IdleLanes, fill_idle_lanes, job_records
from bench.demo.local_jobs import children_stderr_to, owned_local_jobs
from bench.demo.output import write_outputs
from bench.demo.plan import (
    MIN_TICKS,
    DemoPlan,
    Printer,
    Work,
    calibrate_machine,
    eval_todo,
    fmt_time,
    make_plan,
    measured_eval_speed,
    prepare_counts,
    stage_estimate,
)
from bench.launch.grids import expand, load_grid, settings_for
from bench.launch.status import ENDED_STATES, scheduler_states
from bench.launch.submit import grid_status, submit_grid
from bench.prepare.fetch import fashion_mnist_root
from bench.prepare.pipeline import PrepareError, prepare_embedded
from bench.prepare.sources import DatasetError

# One poll (grid_status + the evaluations still to do) costs ~0.3-0.6 s of CPU on a busy 2-core
# machine: every 2 s that took a third of a core from the training lanes, every 5 s about 7%.
POLL_SECONDS = 5.0
# What a first run took where it was measured comes from the checked-in records (bench.demo.timings).
# Machines differ by 3x or more, so no budget is promised blindly: before any work the demo times
# this machine (bench.demo.calibrate) and prints its own estimate of every stage.
BUDGET_S = 45 * 60  # what a first run of the full demo may take on 2 cores (ablations/grids/demo.yaml)


class DemoError(ValueError):
    """A demo stage failed or cannot start; the message names the log or the setting to change."""


def _last_tick(run: Path) -> dict:
    rows = runfolder.read_jsonl(run / runfolder.METRICS_FILE)
    return rows[-1] if rows else {}


def first_failure(rows: Sequence[dict], stage: str) -> Optional[str]:

    for r in rows:
        if stage == "train" and r["state"] in ENDED_STATES:
            return f"training of cell {r['cell']} failed: {r['detail']}\n  log: {r['log']}"
        if stage == "eval" and r.get("eval_errors"):
            return f"evaluation of cell {r['cell']} failed: {r['eval_errors'][0]}"
    return None


def _cell_label(cell) -> str:
    seed = cell.cfg.train.seed
    return f"{cell.cfg.spec} s{seed}"


def run_train(plan: DemoPlan, grid, cells, work: Work, printer: Printer, idle: IdleLanes) -> int:
    """Submit the training cells (finished ones are skipped) and follow them, evaluating finished
    cells in the lanes training leaves idle (bench.demo.idle_lane); returns # trained."""

    with children_stderr_to(plan.runs_root / plan.grid / ".submitit" / "executors.log"):
        sub = submit_grid(plan.grid, "train", local=True, overrides=plan.overrides, quiet=True)
    done_before = [s["cell"] for s in sub.skipped if s["reason"] == "done"]
    printer.say(f"train: {len(cells)} cells in {plan.lanes} lane(s); {len(done_before)} finished earlier "
                f"(reused), {len(cells) - len(done_before)} to train"
                + (f"; logs under {Path(sub.jobs[0]['log']).parent}" if sub.jobs else ""))
    if len(done_before) == len(cells):
        return 0
    todo = eval_todo(grid, cells)  # fixed while training runs: read once, not every poll
    while True:
        rows = grid_status(grid, plan.overrides)
        error = first_failure(rows, "train")
        if error:
            raise DemoError(error + "\n  fix the cause and run `bench demo` again: it resumes")
        if all(r["state"] == "done" for r in rows):
            return len(cells) - len(done_before)
        evaluating = fill_idle_lanes(idle, plan, rows, lambda: eval_todo(grid, cells))
        running = [i for i, r in enumerate(rows) if r["state"] == "running"]
        parts, rates = [], []
        for i in running:
            cell, row = cells[i], rows[i]
            tick = _last_tick(Path(row["run_dir"]))
            predicted = (cell.cfg.train.batch_size / work.costs.train_step_s[cell.cfg.spec]
                         if work.costs else None)
            work.observe(row["run_dir"], tick, predicted)
            if isinstance(tick.get("images_per_s"), (int, float)):
                rates.append(tick["images_per_s"])
            parts.append(f"{_cell_label(cell)} {row['step'] or 0}/{row['max_steps']}")
        parts += [f"evaluating {label}" for label in evaluating]
        finished = sum(r["state"] == "done" for r in rows)
        speed = f"{sum(rates):.0f} img/s" if rates else "starting"
        est = stage_estimate(work, rows, todo)
        if est is not None and (work.measured or work.costs is not None):
            times = f"training ~{fmt_time(est.train_s)} left, demo ~{fmt_time(est.train_s + est.eval_s)} left"
        else:
            times = f"time left: measuring ({work.ticks}/{MIN_TICKS} ticks)"
        printer.line(f"train {finished}/{len(cells)} done; {', '.join(parts) or 'waiting'}  {speed}  "
                     f"{times} (elapsed {fmt_time(time.time() - work.started)})",
                     key=",".join(str(i) for i in running))
        time.sleep(POLL_SECONDS)


def evaluation_count(grid, cells) -> int:
    """Evaluations of the grid's cells: cell x sampling setting x step."""
    return sum(len(s.scores(c.eval_steps)) for c in cells for s in settings_for(grid, c))


def run_eval(plan: DemoPlan, grid, cells, work: Work, printer: Printer, idle: IdleLanes, reused: int) -> None:
    """Submit the missing evaluations and follow them, with those still running from the training
    stage (`idle`); `reused`: evaluations measured before this call."""

    todo = eval_todo(grid, cells)
    total = evaluation_count(grid, cells)
    beside = f"{idle.evaluations} run beside training, " if idle.evaluations else ""
    printer.say(f"eval: {total} evaluations (cell x sampling setting x step); {reused} measured earlier "
                f"(reused), {beside}{total - reused - idle.evaluations} to run")
    if not todo:
        return
    with children_stderr_to(plan.runs_root / plan.grid / ".submitit" / "executors.log"):
        sub = submit_grid(plan.grid, "eval", local=True, overrides=plan.overrides, quiet=True)
    jobs = [{"executor": "local", "job_id": j["job_id"]} for j in sub.jobs if j.get("job_id")]
    jobs += job_records(idle)
    while True:
        rows = grid_status(grid, plan.overrides)
        error = first_failure(rows, "eval")
        if error:
            raise DemoError(error + "\n  fix the cause and run `bench demo` again: it resumes")
        todo = eval_todo(grid, cells)
        if not todo:
            return
        if jobs and all(s == "GONE" for s in scheduler_states(jobs).values()):
            time.sleep(POLL_SECONDS)  # the last row may land just after the job exits
            if eval_todo(grid, cells):
                raise DemoError(f"the evaluation jobs ended with {len(todo)} evaluations missing; "
                                f"see the logs under {plan.runs_root / plan.grid / '.submitit' / 'eval'}")
        work.eval_speed = measured_eval_speed(cells, work.costs) if work.costs else None
        est = stage_estimate(work, None, todo)
        left = f"demo ~{fmt_time(est.eval_s)} left" if est else "time left: measuring"
        printer.line(f"eval {total - len(todo)}/{total} done  {left} (elapsed "
                     f"{fmt_time(time.time() - work.started)})", key="eval")
        time.sleep(POLL_SECONDS)


def run_demo(plan: DemoPlan, printer: Printer) -> Path:

    began = time.time()
    grid = load_grid(plan.grid)
    cells = expand(grid, plan.overrides)
    _announce(plan, cells, printer)
    manifest = plan.prepared_dir / "manifest.json"
    stamp = manifest.stat().st_mtime_ns if manifest.is_file() else None
    work = Work(cells, started=began)
    est = _estimate_before_work(plan, grid, cells, work, printer, stamp)
    reused_evaluations = evaluation_count(grid, cells) - len(eval_todo(grid, cells))
    idle = IdleLanes(plan.lanes)
    t0 = time.time()
    times = {"measure": t0 - began}  # the grid, the calibration and the estimate, before any work
    _prepare(plan, printer, stamp)
    times["prepare"] = time.time() - t0
    t0 = time.time()
    trained = run_train(plan, grid, cells, work, printer, idle)
    times["train"] = time.time() - t0
    t0 = time.time()
    run_eval(plan, grid, cells, work, printer, idle, reused_evaluations)
    times["eval"] = time.time() - t0
    evaluated = evaluation_count(grid, cells) - reused_evaluations
    printer.say("report: tables, convergence plots, paired differences and sample figures ...")
    same = manifest.is_file() and manifest.stat().st_mtime_ns == stamp  # prepare wrote nothing
    reused = {"prepare": same, "trained": trained, "cells": len(cells), "evaluated": evaluated}
    estimate_record = None
    if work.costs is not None:
        estimate_record = {"calibration_s": round(work.costs.seconds, 1), "lanes": plan.lanes,
                           "threads": plan.threads, **{k: round(v, 1) for k, v in vars(est).items()},
                           "units": work.costs.units()}
    printer.say(write_outputs(plan, grid, cells, times, reused, began, estimate_record))
    return plan.out_dir


def _announce(plan: DemoPlan, cells, printer: Printer) -> None:
    """What runs (specs, seeds, cells) and where everything comes from and goes."""
    specs = sorted({c.cfg.spec for c in cells}, key=[c.cfg.spec for c in cells].index)
    seeds = sorted({c.cfg.train.seed for c in cells})
    printer.say(f"bench demo{' --quick' if plan.grid == 'demo_quick' else ''}: grid {plan.grid}: "
                f"{', '.join(specs)}; {len(seeds)} paired seed(s) each; {len(cells)} cells\n"
                + (f"  measured elsewhere: {plan.measured}\n" if plan.measured else "")
                + f"  data: {plan.prepare_note}"
                f"{f' from {plan.data_root}' if plan.data_root else ''}\n"
                f"  prepared: {plan.prepared_dir}\n  runs: {plan.runs_root / plan.grid}\n"
                f"  output: {plan.out_dir}")


@contextlib.contextmanager
def _fetch_hint(plan: DemoPlan):
    """The full demo's missing or unreadable Fashion-MNIST also names `--quick`, which needs no files."""
    try:
        yield
    except DatasetError as err:
        if plan.grid == "demo_quick":
            raise
        raise DemoError(f"{err}; or run `bench demo --quick` (scikit-learn digits, nothing to "
                        "install)") from None


def _estimate_before_work(plan: DemoPlan, grid, cells, work: Work, printer: Printer,
                          stamp: Optional[int]) -> Optional[Estimate]:
    """Calibrate this machine (sets `work.costs`) unless everything is done, and print what every
    stage will take. `stamp`: the prepared manifest's mtime (None: prepare has not finished)."""
    with _fetch_hint(plan):
        counts = None if stamp else prepare_counts(plan)
    rows = grid_status(grid, plan.overrides)
    todo = eval_todo(grid, cells)
    if stamp is None or todo or any(r["state"] != "done" for r in rows):  # else: nothing to estimate
        work.costs = calibrate_machine(plan, cells, grid, printer, first_run=stamp is None, todo=todo)
    if work.costs is None:
        return None
    est = stage_estimate(work, rows, todo, counts)
    finish = time.strftime("%H:%M", time.localtime(time.time() + est.total_s))
    compile_s = work.costs.train_compile_s
    train_units = ", ".join(f"{spec} {seconds:.2f}" + (f" + {compile_s[spec]:.0f} s compile" if spec in compile_s
                                                       else "") for spec, seconds in work.costs.train_step_s.items())
    printer.say(f"estimate for this machine (measured in {work.costs.seconds:.0f} s; s/step {train_units}): "
                + (f"prepare ~{fmt_time(est.prepare_s)} (first run only), " if counts else "")
                + f"training ~{fmt_time(est.train_s)}, evaluation ~{fmt_time(est.eval_s)}; "
                f"total ~{fmt_time(est.total_s)}, done around {finish} if the machine stays as "
                "loaded as now")
    if plan.grid == "demo" and est.total_s > BUDGET_S:
        printer.say(f"  that is over the demo's {BUDGET_S // 60:.0f}-minute budget on this machine (slower "
                    "or busier than the one it was sized on); it still runs to the end and resumes "
                    "after Ctrl-C. The smaller setting, `bench demo --quick`, is a few-minute smoke run "
                    "of the same path on digits.")
    return est


def _prepare(plan: DemoPlan, printer: Printer, stamp: Optional[int]) -> None:
    """The embedded default's prepared data: made on a first run, checked (and reused) after."""
    printer.say("prepare: " + ("checking the cached prepared data ..." if stamp else
                               "first run: training the VAE and the evaluation classifier, then "
                               "encoding the images (cached for every later run) ..."))
    try:
        with _fetch_hint(plan):
            prepare_embedded(plan.prepared_dir, plan.data_name, plan.prepare, pca_rank_max=16,
                             data_root=plan.data_root)
    except PrepareError as err:  # e.g. the folder holds another prepare: name the demo's option
        raise DemoError(f"{err} (bench demo: --prepared-dir DIR chooses the folder)") from None


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bench demo", description="Table 1 of ReDi in miniature on this machine (CPU, offline): "
        "prepare, train latent only / REPA / ReDi / ReDi+RG, evaluate, report.")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run of the same path on scikit-learn digits (minutes: docs/demo.md)")
    parser.add_argument("--out", help="output folder (default results/demo or results/demo-quick)")
    parser.add_argument("--runs-root", help="where the run folders go (default results/runs)")
    parser.add_argument("--prepared-dir", help="prepared data (default results/prepared, as "
                        "`bench prepare`, or results/prepared-quick)")
    parser.add_argument("--data-root", metavar="DIR", help="a folder with the four Fashion-MNIST idx.gz "
                        "files (default: Debian's dataset-fashion-mnist, else fetched once into "
                        "~/.cache/redi-bench/fashion-mnist)")
    parser.add_argument("--no-progress", action="store_true", help="stage lines only")
    parser.add_argument("--every", type=float, default=20.0,
                        help="seconds between progress lines when stdout is not a terminal")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the jobs inherit it: nothing is downloaded
    if args.quick and args.data_root:
        raise DemoError("--data-root names the Fashion-MNIST folder of the full demo; --quick runs on "
                        "scikit-learn's digits, which need no files")
    plan = make_plan(args.quick, args.out, args.runs_root, args.prepared_dir, not args.no_progress)
    # Up front, not at the report stage after all the work: one line each.
    for folder, option in ((plan.out_dir, "--out"), (plan.runs_root, "--runs-root"),
                           (plan.prepared_dir, "--prepared-dir")):
        check_writable_dir(folder, option)
    if not args.quick:  # where the images come from, fetched into the cache if nowhere else
        plan = replace(plan, data_root=fashion_mnist_root(args.data_root))
    printer = Printer(enabled=not args.no_progress, every=args.every)
    try:
        with owned_local_jobs():  # its jobs end with it, however it ends
            out = run_demo(plan, printer)
    except (KeyboardInterrupt, SystemExit) as stopped:
        why = "interrupted" if isinstance(stopped, KeyboardInterrupt) else f"signal {stopped.code - 128}" \
            if isinstance(stopped.code, int) and stopped.code > 128 else "exit"
        print(f"\nbench demo: stopped ({why}); its jobs were stopped too. Finished cells, checkpoints "
              "and evaluations are kept; run the same command again to resume.", file=sys.stderr, flush=True)
        raise
    print(f"bench demo: output in {out}", flush=True)
    return 0
