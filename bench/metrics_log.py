"""One metrics logger for training and evaluation: JSONL always, TensorBoard and W&B when asked.

The JSONL files of the run folder are the record every command reads (`bench status`, `bench
report`, the demo): training ticks go to metrics.jsonl, evaluation rows to eval.jsonl, through
`bench.runfolder`'s one appender. `train.log_to` adds views for people who watch runs in the tools
they already use; a sink never decides what is recorded, and none is required:

    tensorboard   event files in <run>/tensorboard/train/ and .../eval/ (torch.utils.tensorboard's
                  writer; two TensorBoard runs); watch with `tensorboard --logdir results/runs`
    wandb         a Weights & Biases run in <run>/wandb/, offline unless WANDB_MODE says otherwise
                  (WANDB_MODE=online streams it); `wandb sync <run>/wandb/offline-run-*` uploads it.
                  Run id = the run hash, so every (re)start of a run adds to the same W&B run.

Scalars: every numeric field of a training row but `step` and the wall-clock `time`, as
`train/<field>` at its step; an evaluation row as `eval/<setting>/<metric>` at its step. When
training (re)starts from step S (0 for a fresh start), TensorBoard's `purge_step` (S + 1) hides the
training events a killed process wrote past S, as the JSONL log is cut at S (`forget_after`); the
evaluation events live in their own folder, which no purge touches. Only rank 0 logs.

A sink whose library is missing is one ConfigError naming `train.log_to` (`check_sinks`), raised
before the run writes anything.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any, Optional, Sequence

from bench.config import LOG_SINKS, ConfigError
from bench.runfolder import (
    EVAL_FILE,
    METRICS_FILE,
    TENSORBOARD_DIR,
    append_jsonl,
    eval_key,
    truncate_jsonl,
)

SINKS = {name: name for name in LOG_SINKS}  # train.log_to name -> the package it needs
NOT_SCALARS = ("step", "time")  # the row's position, and a wall-clock timestamp


def check_sinks(names: Sequence[str]) -> None:
    """ConfigError unless every sink of train.log_to is known and its library importable."""
    for name in names:
        if name not in SINKS:
            raise ConfigError(f"train.log_to: {name!r} is not a sink; choose from {sorted(SINKS)}")
        package = SINKS[name]
        try:
            found = importlib.util.find_spec(package) is not None
        except ValueError:  # a module object without a spec (e.g. replaced in sys.modules)
            found = False
        if not found:
            raise ConfigError(f"train.log_to includes {name!r} but the {package!r} package is not "
                              f"installed; install it with `pip install 'redi-bench[trackers]'` or remove "
                              f"{name} from train.log_to")


def forget_after(run_dir: Path, step: int) -> int:
    """Cut metrics.jsonl after the last row at or before `step` (the step a run resumes from, 0
    for a fresh start): those rows will be logged again, identically. Returns the rows cut."""
    return truncate_jsonl(Path(run_dir) / METRICS_FILE, lambda row: row.get("step", 0) <= step)


def _scalars(row: dict, prefix: str) -> dict[str, float]:
    return {f"{prefix}{key}": float(value) for key, value in row.items()
            if key not in NOT_SCALARS and isinstance(value, (int, float)) and not isinstance(value, bool)}


class _TensorBoard:
    """One writer per kind of row (train, eval), opened at its first row."""

    def __init__(self, run_dir: Path, resume_step: Optional[int]) -> None:
        self.root, self.resume_step, self.writers = run_dir / TENSORBOARD_DIR, resume_step, {}

    def log(self, scalars: dict[str, float], step: int) -> None:
        kind = next(iter(scalars)).split("/")[0]
        if kind not in self.writers:
            from torch.utils.tensorboard import SummaryWriter

            purge = self.resume_step + 1 if kind == "train" and self.resume_step is not None else None
            self.writers[kind] = SummaryWriter(log_dir=str(self.root / kind), purge_step=purge)
        for key, value in scalars.items():
            self.writers[kind].add_scalar(key, value, global_step=step)
        self.writers[kind].flush()

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()


class _WandB:
    def __init__(self, run_dir: Path, run_name: str, run_id: str, config: Optional[dict]) -> None:
        import wandb

        self.run = wandb.init(dir=str(run_dir), project=os.environ.get("WANDB_PROJECT", "redi-bench"),
                              name=run_name, id=run_id, resume="allow", config=config,
                              mode=os.environ.get("WANDB_MODE", "offline"),
                              settings=wandb.Settings(silent=True))

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


class MetricsLogger:
    """The run's metrics: `log_train` / `log_eval` write JSONL and every sink of `sinks`. A trainer
    passes the step it (re)starts from as `resume_step`; an evaluator passes nothing."""

    def __init__(self, run_dir: Path, sinks: Sequence[str] = (), *, run_name: str = "", run_id: str = "",
                 config: Optional[dict] = None, resume_step: Optional[int] = None) -> None:
        check_sinks(sinks)
        self.run_dir = Path(run_dir)
        self.sinks: list[Any] = []
        try:
            for name in sinks:
                if name == "tensorboard":
                    self.sinks.append(_TensorBoard(self.run_dir, resume_step))
                else:
                    self.sinks.append(_WandB(self.run_dir, run_name or self.run_dir.name,
                                             run_id or self.run_dir.name, config))
        except BaseException:
            self.close()
            raise

    def log_train(self, row: dict) -> None:
        """One training tick: a metrics.jsonl row, and its scalars in every sink."""
        append_jsonl(self.run_dir / METRICS_FILE, [row])
        scalars = _scalars(row, "train/")
        for sink in self.sinks:
            if scalars:
                sink.log(scalars, int(row["step"]))

    def log_eval(self, rows: Sequence[dict]) -> list[dict]:
        """Evaluation rows not recorded yet (by (step, metric, setting)); returns those written."""
        rows = [{key: row[key] for key in sorted(row)} for row in rows]  # eval rows: keys sorted
        written = append_jsonl(self.run_dir / EVAL_FILE, rows, key=eval_key)
        by_step: dict[int, dict[str, float]] = {}
        for row in written:
            by_step.setdefault(int(row["step"]), {})[f"eval/{row.get('setting', 'default')}/{row['metric']}"] = \
                float(row["value"])
        for step in sorted(by_step):
            for sink in self.sinks:
                sink.log(by_step[step], step)
        return written

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
        self.sinks = []

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
