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

Re-running reuses everything finished: prepare returns at once, the launcher skips finished cells
and measured evaluations, and only the report is written again. The demo owns its local jobs: each
runs in its own process group, which is ended however the demo ends (Ctrl-C, SIGTERM, SIGHUP, a
failing cell, an error) and, should the demo be SIGKILLed, by the kernel (the job controller's
parent-death signal). The next run resumes from their checkpoints.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

from bench import runfolder
from bench.atomic import check_writable_dir
from bench.config import DataConfig
from bench.demo.calibrate import Costs, Estimate, measure
from bench.demo.calibrate import estimate as calibrate_estimate
from bench.demo.output import write_outputs
from bench.demo.timings import measured_elsewhere
from bench.launch.grids import eval_config, expand, load_grid, settings_for
from bench.launch.jobs import measured_steps
from bench.launch.profiles import load_profile
from bench.launch.status import ENDED_STATES, scheduler_states
from bench.launch.submit import grid_status, submit_grid
from bench.prepare.embedded import ClassifierSettings, EmbeddedVAESettings
from bench.prepare.fetch import fashion_mnist_root
from bench.prepare.pipeline import PrepareError, PrepareOptions, prepare_embedded
from bench.prepare.sources import DatasetError, open_split

# One poll (grid_status + the evaluations still to do) costs ~0.3-0.6 s of CPU on a busy 2-core
# machine: every 2 s that took a third of a core from the training lanes, every 5 s about 7%.
POLL_SECONDS = 5.0
# What a first run took where it was measured comes from the checked-in records (bench.demo.timings).
# Machines differ by 3x or more, so no budget is promised blindly: before any work the demo times
# this machine (bench.demo.calibrate) and prints its own estimate of every stage.
BUDGET_S = 45 * 60  # what a first run of the full demo may take on 2 cores (ablations/grids/demo.yaml)
# Smoothing of the measured training speed behind every time-left figure: an exponential moving
# average over log ticks, shown only after MIN_TICKS of them (single ticks swing with the load and
# with a cell's start-up, and made the time left jump from 42 min to 1 min).
RATE_SMOOTHING = 0.3
MIN_TICKS = 3


class DemoError(ValueError):
    """A demo stage failed or cannot start; the message names the log or the setting to change."""


@dataclass(frozen=True)
class DemoPlan:
    """Which grid, which data, where everything goes, and how the data is prepared."""

    grid: str
    data_name: str
    prepared_dir: Path
    runs_root: Path
    out_dir: Path
    prepare: PrepareOptions
    prepare_note: str
    measured: Optional[str]
    """What a first run took where it was measured (machine, load, date; bench.demo.timings), None
    without a record; this machine's own estimate is printed before any work (bench.demo.calibrate)."""
    lanes: int = 1
    """Jobs at a time (the local profile's array_parallelism), each with `threads` compute threads."""
    threads: int = 1
    calibrate: bool = True
    data_root: Optional[str] = None
    """The Fashion-MNIST folder (--data-root or the fetched cache); None: Debian's package."""

    @property
    def data(self) -> DataConfig:
        return DataConfig(name=self.data_name, root=self.data_root, image_size=32, num_classes=10)

    @property
    def overrides(self) -> list[str]:
        root = [f"data.root={self.data_root}"] if self.data_root else []
        return [f"output_root={self.runs_root}", f"data.prepared_dir={self.prepared_dir}", *root]


def make_plan(quick: bool, out: Optional[str], runs_root: Optional[str],
              prepared_dir: Optional[str], progress: bool = True, calibrate: bool = True) -> DemoPlan:
    profile = load_profile("local")  # the lanes and threads `bench grid --local` uses too
    lanes, threads = profile.array_parallelism, profile.cpus_per_task
    if quick:  # scikit-learn digits and small prepare networks: a smoke run of the whole path
        options = PrepareOptions(
            vae=EmbeddedVAESettings(block_out_channels=(16, 32, 32), steps=100, scale_images=1024),
            classifier=ClassifierSettings(width=16, feature_dim=32, epochs=10), progress=False,
            lanes=lanes)
        grid, data, measured = "demo_quick", "digits", None
        note = ("scikit-learn digits (1,437 train / 360 test images), small VAE and classifier: a "
                "smoke run of the whole path whose numbers say nothing about the methods")
        prepared, out_default = "results/prepared-quick", "results/demo-quick"
    else:  # exactly `bench prepare`'s default, so either command fills the cache for the other
        options = PrepareOptions(progress=progress, lanes=lanes)
        grid, data, measured = "demo", "fashion_mnist", measured_elsewhere()
        note = "Fashion-MNIST (60,000 train / 10,000 test images), the embedded default"
        prepared, out_default = "results/prepared", "results/demo"
    return DemoPlan(grid, data, Path(prepared_dir or prepared).resolve(),
                    Path(runs_root or "results/runs").resolve(), Path(out or out_default).resolve(),
                    options, note, measured, lanes, threads, calibrate)


# ------------------------------------------------------------------------------------------------
# Progress


def fmt_time(seconds: Optional[float]) -> str:
    if seconds is None:
        return "?"
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s"


@dataclass
class Printer:
    """One progress line: rewritten in place on a terminal, else printed every `every` seconds."""

    enabled: bool = True
    every: float = 20.0
    tty: bool = field(default_factory=lambda: sys.stdout.isatty())
    _last: float = 0.0
    _key: str = ""
    _open: bool = False

    def line(self, text: str, key: str = "") -> None:
        if not self.enabled:
            return
        now = time.time()
        if self.tty:
            if key != self._key and self._open:
                print(flush=True)  # keep the finished cell's last line
            print("\r" + text[:160].ljust(100), end="", flush=True)
            self._open = True
        elif key != self._key or now - self._last >= self.every:
            print(text, flush=True)
            self._last = now
        self._key = key

    def say(self, text: str) -> None:
        if self._open:
            print(flush=True)
            self._open = False
        print(text, flush=True)


@dataclass
class Work:
    """What the demo waits for, and the estimates behind the time-left figures.

    The calibration's costs (bench.demo.calibrate) give every estimate before anything runs; once
    training ticks arrive, `speed` (measured images/s over the calibration's, smoothed) scales them,
    so a machine that became busier after the calibration is followed.
    """

    cells: list
    costs: Optional[Costs] = None
    started: float = field(default_factory=time.time)
    speed: float = 1.0
    ticks: int = 0  # log ticks folded into `speed`
    sample_unit_s: Optional[float] = None  # measured seconds per (image x solver step x pass)
    _seen: set = field(default_factory=set)

    def observe(self, run: str, tick: dict, predicted_images_per_s: Optional[float] = None) -> None:
        """Fold a new log tick's images/s (over the calibration's prediction) into the average."""
        key, rate = (run, tick.get("step")), tick.get("images_per_s")
        if key in self._seen or not isinstance(rate, (int, float)) or rate <= 0:
            return
        self._seen.add(key)
        ratio = float(rate) / predicted_images_per_s if predicted_images_per_s else float(rate)
        self.speed = ratio if self.ticks == 0 else RATE_SMOOTHING * ratio + (1 - RATE_SMOOTHING) * self.speed
        self.ticks += 1

    @property
    def measured(self) -> bool:
        return self.ticks >= MIN_TICKS


def _last_tick(run: Path) -> dict:
    rows = runfolder.read_jsonl(run / runfolder.METRICS_FILE)
    return rows[-1] if rows else {}


def eval_todo(grid, cells) -> list[tuple]:
    """(cell, setting name, eval config, step) of every evaluation not measured yet."""

    todo = []
    for cell in cells:
        for setting in settings_for(grid, cell):
            cfg = eval_config(cell, setting)
            steps = setting.scores(cell.eval_steps)
            done = measured_steps(cfg, Path(cell.run_dir), steps, setting.name)
            todo += [(cell, setting.name, cfg, step) for step in steps if step not in done]
    return todo


def _passes(cfg) -> int:
    """Network evaluations per image and solver step (guided passes are batched together)."""
    g = cfg.eval.guidance
    return 1 + (g.cfg_scale != 1.0) + (g.rg_scale != 1.0)


def stage_estimate(work: Work, rows: Optional[Sequence[dict]], todo: Sequence[tuple],
                   prepare_counts: Optional[dict] = None) -> Optional[Estimate]:
    """Seconds left of each stage from the calibration, scaled by the measured training speed;
    evaluation uses its own measured speed once an evaluation has finished. None uncalibrated."""
    if work.costs is None:
        return None
    left = []
    for index, cell in enumerate(work.cells):
        row = rows[index] if rows else {"state": "", "step": 0}
        if row["state"] != "done":
            left.append((cell.cfg.spec, cell.cfg.train.max_steps - (row["step"] or 0)))
    evaluations = [(cfg.eval.num_samples, cfg.eval.num_sampling_steps, _passes(cfg)) for _, _, cfg, _ in todo]
    raw = calibrate_estimate(work.costs, left, evaluations, prepare_counts)
    eval_s = raw.eval_s / work.speed
    if work.sample_unit_s:  # measured by the evaluations themselves: no scaling needed
        eval_s = calibrate_estimate(replace(work.costs, sample_unit_s=work.sample_unit_s), [], evaluations,
                                    None).eval_s
    return Estimate(raw.prepare_s, raw.train_s / work.speed, eval_s)


def measured_sample_step(cells) -> Optional[float]:
    """Seconds per image x solver step x pass, from the wall times eval.jsonl records."""
    total = cost = 0.0
    for cell in cells:
        seen = {}
        for r in runfolder.read_eval_rows(cell.run_dir):
            g = r.get("guidance") or {}
            units = r.get("n", 0) * r.get("sampling_steps", 0) * (
                1 + (g.get("cfg_scale", 1.0) != 1.0) + (g.get("rg_scale", 1.0) != 1.0))
            seen[(r.get("step"), r.get("setting"))] = (r.get("wall_time_s") or 0.0, units)
        for seconds, units in seen.values():
            total, cost = total + seconds, cost + units
    return total / cost if cost and total else None


def calibrate_machine(plan: DemoPlan, cells, grid, printer: Printer, first_run: bool) -> Optional[Costs]:
    """Time this machine's units of work (~30 s) and print what every stage will take."""
    if not plan.calibrate:
        return None
    printer.say(f"measuring this machine ({plan.lanes} lane(s) x {plan.threads} thread(s), "
                f"about {10 if plan.grid == 'demo_quick' else 30} s) ...")
    specs = {}
    for cell in cells:
        specs.setdefault(cell.cfg.spec, [*grid.base, f"spec={cell.cfg.spec}"])
    sample_spec = next(iter(specs))
    quick = plan.grid == "demo_quick"  # its units take milliseconds: a short look is enough
    return measure(specs, sample_spec, plan.lanes, plan.threads,
                   prepare=(plan.prepare.vae, plan.prepare.classifier, plan.prepare.batch_size)
                   if first_run else None,
                   budget_s=0.5 if quick else 2.0)


def prepare_counts(plan: DemoPlan) -> dict:
    """Units of work of a first prepare (see bench.demo.calibrate.estimate)."""
    images = sum(len(open_split(plan.data, split)) for split in plan.prepare.splits)
    train = len(open_split(plan.data, "train"))
    c = plan.prepare.classifier
    return {"vae_steps": plan.prepare.vae.steps, "images": images,
            "classifier_steps": max(1, int(c.epochs * train / c.batch_size)) if plan.prepare.train_classifier else 0}


# ------------------------------------------------------------------------------------------------
# Stages


@contextlib.contextmanager
def children_stderr_to(log: Path):
    """Processes started inside get `log` as their stderr; this process keeps its own.

    The local executor starts one controller process per job (`submitit.local._local`) on the
    terminal's stderr. Ctrl-C reaches it with the rest of the terminal's process group and its
    KeyboardInterrupt traceback landed in the user's terminal after "bench demo: stopped"; its
    jobs already write their own logs. Popen inherits file descriptor 2 as it is at the fork, so
    pointing fd 2 at a log file while the jobs are submitted sends the controllers' output there.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(log, "ab") as handle:
            os.dup2(handle.fileno(), 2)
        yield log
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


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


def run_train(plan: DemoPlan, grid, cells, work: Work, printer: Printer) -> int:
    """Submit the training cells (finished ones are skipped) and follow them; returns # trained."""

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


def run_eval(plan: DemoPlan, grid, cells, work: Work, printer: Printer) -> int:
    """Submit the missing evaluations and follow them; returns # evaluations run."""

    todo = eval_todo(grid, cells)
    total = sum(len(s.scores(c.eval_steps)) for c in cells for s in settings_for(grid, c))
    printer.say(f"eval: {total} evaluations (cell x sampling setting x step); {total - len(todo)} "
                f"measured earlier (reused), {len(todo)} to run")
    if not todo:
        return 0
    with children_stderr_to(plan.runs_root / plan.grid / ".submitit" / "executors.log"):
        sub = submit_grid(plan.grid, "eval", local=True, overrides=plan.overrides, quiet=True)
    jobs = [{"executor": "local", "job_id": j["job_id"]} for j in sub.jobs if j.get("job_id")]
    first = len(todo)
    while True:
        rows = grid_status(grid, plan.overrides)
        error = first_failure(rows, "eval")
        if error:
            raise DemoError(error + "\n  fix the cause and run `bench demo` again: it resumes")
        todo = eval_todo(grid, cells)
        if not todo:
            return first
        if jobs and all(s == "GONE" for s in scheduler_states(jobs).values()):
            time.sleep(POLL_SECONDS)  # the last row may land just after the job exits
            if eval_todo(grid, cells):
                raise DemoError(f"the evaluation jobs ended with {len(todo)} evaluations missing; "
                                f"see the logs under {Path(sub.jobs[0]['log']).parent}")
        work.sample_unit_s = measured_sample_step(cells) or work.sample_unit_s
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
    t0 = time.time()
    _prepare(plan, printer, stamp)
    times = {"prepare": time.time() - t0}
    t0 = time.time()
    trained = run_train(plan, grid, cells, work, printer)
    times["train"] = time.time() - t0
    t0 = time.time()
    evaluated = run_eval(plan, grid, cells, work, printer)
    times["eval"] = time.time() - t0
    printer.say("report: tables, convergence plots, paired differences and sample figures ...")
    same = manifest.is_file() and manifest.stat().st_mtime_ns == stamp  # prepare wrote nothing
    reused = {"prepare": same, "trained": trained, "cells": len(cells), "evaluated": evaluated}
    estimate_record = None
    if work.costs is not None:
        estimate_record = {"calibration_s": round(work.costs.seconds, 1), "lanes": plan.lanes,
                           "threads": plan.threads, **{k: round(v, 1) for k, v in vars(est).items()}}
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
        work.costs = calibrate_machine(plan, cells, grid, printer, first_run=stamp is None)
    if work.costs is None:
        return None
    est = stage_estimate(work, rows, todo, counts)
    finish = time.strftime("%H:%M", time.localtime(time.time() + est.total_s))
    train_units = ", ".join(f"{spec} {work.costs.train_step_s[spec]:.2f}" for spec in work.costs.train_step_s)
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


# ------------------------------------------------------------------------------------------------
# The demo's children end with it

JOB_STOP_GRACE_S = 5.0  # SIGINT first (the job records `interrupted`), SIGKILL after this long


def _parent_death_signal() -> Optional[Callable[[], None]]:
    """A preexec_fn that asks the kernel to send SIGINT to the child when this process dies (Linux
    prctl PR_SET_PDEATHSIG; None elsewhere). SIGINT, because submitit's local controller answers it by
    stopping its tasks (SIGINT, then SIGKILL) in a `finally`; SIGTERM it would only forward, and the
    tasks ignore SIGTERM."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here: nothing is loaded after fork
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        # A demo started in the background (`nohup bench demo &`) runs with SIGINT ignored, which
        # the controller would inherit, and then neither this signal nor _end_groups' would stop it.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        prctl(1, int(signal.SIGINT), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the demo died between fork and prctl
            os.kill(os.getpid(), signal.SIGINT)
    return preexec


def _end_groups(groups: Sequence[int], grace_s: float = JOB_STOP_GRACE_S) -> None:
    """SIGINT every process group, SIGKILL what is left of them after `grace_s`."""
    def alive(group: int) -> bool:
        with contextlib.suppress(OSError):  # reap the controller if it has ended (it is our child)
            os.waitpid(group, os.WNOHANG)
        if Path("/proc/self/stat").is_file():  # zombies (ended, not reaped by init) do not count
            for stat in Path("/proc").glob("[0-9]*/stat"):
                with contextlib.suppress(OSError, IndexError, ValueError):
                    fields = stat.read_text().rsplit(")", 1)[1].split()  # state, ppid, pgrp, ...
                    if fields[0] != "Z" and int(fields[2]) == group:
                        return True
            return False
        try:
            os.killpg(group, 0)
            return True
        except (ProcessLookupError, PermissionError):
            return False
    live = [g for g in groups if alive(g)]
    for group in live:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, signal.SIGINT)
    deadline = time.time() + grace_s
    while live and time.time() < deadline:
        time.sleep(0.1)
        live = [g for g in live if alive(g)]
    for group in live:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, signal.SIGKILL)


@contextlib.contextmanager
def owned_local_jobs() -> Iterator[list[int]]:
    """Inside: every submitit local job starts in a new process group (its controller and tasks) with
    the parent-death signal set; SIGTERM and SIGHUP raise SystemExit. On leaving, however that
    happens, the groups are ended. Yields the list of group ids (the controllers' pids)."""
    from submitit.local import local as submitit_local

    groups: list[int] = []
    preexec = _parent_death_signal()
    original = submitit_local.start_controller

    def start_controller(*args, **kwargs):
        popen = subprocess.Popen

        class OwnedPopen(popen):  # type: ignore[misc,valid-type]
            def __init__(self, *a, **k):
                k["start_new_session"] = True  # the controller leads a group its tasks join
                if preexec is not None:
                    k["preexec_fn"] = preexec
                super().__init__(*a, **k)
                groups.append(self.pid)
        subprocess.Popen = OwnedPopen  # only while submitit starts this one controller
        try:
            return original(*args, **kwargs)
        finally:
            subprocess.Popen = popen

    def stop(signum, _frame) -> None:
        raise SystemExit(128 + signum)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGHUP)}
    submitit_local.start_controller = start_controller
    try:
        yield groups
    finally:
        submitit_local.start_controller = original
        _end_groups(groups)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


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
