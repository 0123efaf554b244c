"""The evaluation noise of the confirmation's checkpoints (exploratory, after the planned test):
each latent-only and each whitened ReDi + RG checkpoint at 600 steps scored under its paired
sampling seed and four more (2000-2003), split into the spread between checkpoints and the spread
between samplings of one checkpoint (bench/report/noise.py).

    PYTHONPATH=$PWD python results/studies/embedded/confirm/noise.py [RUNS]

RUNS: the grid's run folders (e.g. /work/confirm-data/runs/embedded_confirm); they are read into
noise/fd_by_sampling_seed.csv. Without RUNS the checked-in CSV is read. Prints the table
noise/README.md shows.
"""

import json
import sys
from pathlib import Path

import pandas as pd

from bench.report.noise import split_variance

HERE = Path(__file__).resolve().parent / "noise"
CSV = HERE / "fd_by_sampling_seed.csv"
ARMS = {"latent_only": "plain", "redi_rg": "rg1.5"}  # as the plan scores them
STEP = 600


def gather(runs: Path) -> pd.DataFrame:
    rows = []
    for run in sorted(runs.iterdir()):
        spec = run.name.split("-")[0]
        if spec not in ARMS or not (run / "eval.jsonl").exists():
            continue
        for line in (run / "eval.jsonl").read_text().splitlines():
            r = json.loads(line)
            base = r["setting"].split("+seed=")[0]
            if r["metric"] == "fd_classifier" and r["step"] == STEP and base == ARMS[spec]:
                rows.append({"spec": spec, "setting": base, "run": run.name, "train_seed": r["seed"],
                             "sampling_seed": r["sampling_seed"], "fd": r["value"],
                             "checkpoint_sha256": r["checkpoint_sha256"]})
    return pd.DataFrame(rows).sort_values(["spec", "train_seed", "sampling_seed"])


def table(frame: pd.DataFrame) -> str:
    out = ["| spec, sampling | checkpoints x seeds | mean FD | SD between checkpoints, 95% interval "
           "| SD between samplings, 95% interval | SD of one value |", "|---|---|---|---|---|---|"]
    for spec, part in frame.groupby("spec"):
        s = split_variance(part.groupby("run")["fd"].apply(list).tolist())  # each run's own seeds
        out.append(f"| {spec}, {ARMS[spec]} | {s.checkpoints} x {s.seeds_per_checkpoint} | {s.mean:.2f} "
                   f"| {s.sd_between:.2f} [{s.sd_between_ci[0]:.2f}, {s.sd_between_ci[1]:.2f}] "
                   f"| {s.sd_within:.2f} [{s.sd_within_ci[0]:.2f}, {s.sd_within_ci[1]:.2f}] | {s.sd_total:.2f} |")
    return "\n".join(out)


if __name__ == "__main__":
    if len(sys.argv) > 1:
        HERE.mkdir(exist_ok=True)
        gather(Path(sys.argv[1])).to_csv(CSV, index=False)
    print(table(pd.read_csv(CSV)))
