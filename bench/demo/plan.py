"""What `bench demo` runs and how long it takes: the plan (grid, data, folders, the prepare options),
the work it waits for with the time-left estimates, and the progress line that prints them.

Every estimate starts from this machine's calibration (bench.demo.calibrate) and is then scaled by
the training speed measured while the demo runs (`Work.observe`), so a machine that became busier
after the calibration is followed.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from bench import runfolder
from bench.config import DataConfig, EncoderConfig
from bench.demo.calibrate import EVAL_OVERHEAD_S, Costs, Estimate, guidance_mode, measure
from bench.demo.calibrate import estimate as calibrate_estimate
from bench.demo.timings import measured_elsewhere
from bench.launch.grids import eval_config, settings_for
from bench.launch.jobs import measured_steps
from bench.launch.profiles import load_profile
from bench.prepare.embedded import ClassifierSettings, EmbeddedVAESettings
from bench.prepare.options import PrepareOptions, encoder_dtype
from bench.prepare.sources import open_split

# Smoothing of the measured training speed behind every time-left figure: an exponential moving
# average over log ticks, shown only after MIN_TICKS of them (single ticks swing with the load and
# with a cell's start-up, and made the time left jump from 42 min to 1 min).
RATE_SMOOTHING = 0.3
MIN_TICKS = 3


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
    eval_speed: Optional[float] = None  # the finished evaluations' predicted over measured seconds
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


def eval_jobs(todo: Sequence[tuple]) -> list[list[tuple[int, int, str]]]:
    """The evaluations of `todo` (eval_todo's) grouped into the jobs the eval stage submits (one per
    cell and sampling setting, in submission order), each as (samples, solver steps, guidance mode)."""
    jobs: dict = {}
    for cell, setting, cfg, _ in todo:
        g = cfg.eval.guidance
        jobs.setdefault((cell.name, setting), []).append(
            (cfg.eval.num_samples, cfg.eval.num_sampling_steps, guidance_mode(g.cfg_scale, g.rg_scale)))
    return list(jobs.values())


def stage_estimate(work: Work, rows: Optional[Sequence[dict]], todo: Sequence[tuple],
                   prepare_counts: Optional[dict] = None) -> Optional[Estimate]:
    """Seconds left of each stage from the calibration, scaled by the measured training speed;
    evaluation by its own measured speed once an evaluation has finished. None uncalibrated.
    rows: grid_status's rows, None once training is over (no lane then idles beside training, so
    the evaluation is not shortened by one)."""
    if work.costs is None:
        return None
    left = [(cell.cfg.spec, cell.cfg.train.max_steps - (row["step"] or 0))
            for cell, row in zip(work.cells, rows or []) if row["state"] != "done"]
    raw = calibrate_estimate(work.costs, left, eval_jobs(todo), prepare_counts)
    return Estimate(raw.prepare_s, raw.train_s / work.speed, raw.eval_s / (work.eval_speed or work.speed))


def measured_eval_speed(cells, costs: Costs) -> Optional[float]:
    """The calibration's seconds over the measured ones (eval.jsonl's wall times: sampling and
    metrics, without the start that EVAL_OVERHEAD_S stands for) of every finished evaluation:
    below 1 where evaluations ran slower than predicted."""
    predicted = measured = 0.0
    for cell in cells:
        seen = {}
        for r in runfolder.read_eval_rows(cell.run_dir):
            g = r.get("guidance") or {}
            mode = guidance_mode(g.get("cfg_scale", 1.0), g.get("rg_scale", 1.0))
            seen[(r.get("step"), r.get("setting"))] = (
                r.get("wall_time_s") or 0.0,
                costs.evaluation_s(r.get("n", 0), r.get("sampling_steps", 0), mode) - EVAL_OVERHEAD_S)
        for seconds, expected in seen.values():
            measured, predicted = measured + seconds, predicted + expected
    return predicted / measured if predicted and measured else None


def sampling_to_time(todo: Sequence[tuple]) -> dict:
    """Guidance mode -> (a spec sampled in it, the evaluation's batch) for every mode of `todo`
    (eval_todo's), and the unguided step always: a mode not timed is scaled from it, and the time
    left predicts finished evaluations of any mode with it (a resumed demo whose only evaluations
    left are guided has finished unguided ones)."""
    sampling: dict = {}
    for cell, _, cfg, _ in todo:
        g = cfg.eval.guidance
        sampling.setdefault(guidance_mode(g.cfg_scale, g.rg_scale), (cell.cfg.spec, cfg.eval.batch_size))
    if sampling:
        sampling.setdefault("none", next(iter(sampling.values())))
    return sampling


def calibrate_machine(plan: DemoPlan, cells, grid, printer: Printer, first_run: bool,
                      todo: Sequence[tuple] = ()) -> Optional[Costs]:
    """Time this machine's units of work (~30 s, more when the runs compile their step on a cold
    inductor cache) and print what every stage will take. `todo`: eval_todo's evaluations, whose
    guidance modes and batch the sampling is timed in."""
    if not plan.calibrate:
        return None
    import torch

    from bench.train.step import resolve_compile

    cpu = torch.device("cpu")
    compiles = any(resolve_compile(c.cfg.train.compile, cpu, c.cfg.train.max_steps) for c in cells)
    printer.say(f"measuring this machine ({plan.lanes} lane(s) x {plan.threads} thread(s), "
                f"about {10 if plan.grid == 'demo_quick' else 30} s"
                + ("; up to 2 min more the first time torch.compile builds the training step's kernels "
                   "here, which the runs then reuse" if compiles else "") + ") ...")
    specs = {}
    for cell in cells:
        specs.setdefault(cell.cfg.spec, [*grid.base, f"spec={cell.cfg.spec}"])
    sampling = sampling_to_time(todo)
    finish = (plan.prepare.vae, plan.prepare.classifier, todo[0][2].eval.batch_size if todo else 0)
    quick = plan.grid == "demo_quick"  # its units take milliseconds: a short look is enough
    # prepare_embedded's encoder config: encoder.precision at its default, auto
    precision = "fp32" if encoder_dtype(EncoderConfig(), plan.prepare) is None else "bf16"
    return measure(specs, sampling, finish, plan.lanes, plan.threads,
                   prepare=(plan.prepare.vae, plan.prepare.classifier, plan.prepare.batch_size, precision)
                   if first_run else None,
                   budget_s=0.5 if quick else 2.0)


def prepare_counts(plan: DemoPlan) -> dict:
    """Units of work of a first prepare (see bench.demo.calibrate.estimate)."""
    images = sum(len(open_split(plan.data, split)) for split in plan.prepare.splits)
    train = len(open_split(plan.data, "train"))
    c = plan.prepare.classifier
    return {"vae_steps": plan.prepare.vae.steps, "images": images,
            "classifier_steps": max(1, int(c.epochs * train / c.batch_size)) if plan.prepare.train_classifier else 0,
            "reference_images": len(open_split(plan.data, "test"))}  # the embedded FD's reference
