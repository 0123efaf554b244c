"""The evaluation noise of the confirmation's checkpoints (exploratory, after the planned test):
each latent-only and each whitened ReDi + RG checkpoint at 600 steps scored under its paired
sampling seed (1000-1004, one per checkpoint) and under four seeds shared by all (2000-2003), split
into its parts with bench/report/noise.py.

    PYTHONPATH=$PWD python results/studies/embedded/confirm/noise.py [RUNS]

RUNS: the grid's run folders (e.g. /work/confirm-data/runs/embedded_confirm); they are read into
noise/fd_by_sampling_seed.csv. Without RUNS the checked-in CSV is read. Prints the tables
noise/README.md shows.
"""

import json
import sys
from pathlib import Path

import pandas as pd

from bench.report.noise import split_crossed, split_variance

HERE = Path(__file__).resolve().parent / "noise"
CSV = HERE / "fd_by_sampling_seed.csv"
ARMS = {"latent_only": "plain", "redi_rg": "rg1.5"}  # as the plan scores them
STEP = 600
SHARED = [2000, 2001, 2002, 2003]


def gather(runs: Path) -> pd.DataFrame:
    rows = []
    for run in sorted(runs.iterdir()):
        spec = run.name.split("-")[0]
        if spec not in ARMS or not (run / "eval.jsonl").exists():
            continue
        train_seed = json.loads((run / "config.json").read_text())["train"]["seed"]
        for line in (run / "eval.jsonl").read_text().splitlines():
            r = json.loads(line)
            if r["metric"] == "fd_classifier" and r["step"] == STEP and r["setting"].split("+seed=")[0] == ARMS[spec]:
                rows.append({"spec": spec, "setting": ARMS[spec], "run": run.name, "train_seed": train_seed,
                             "sampling_seed": r["sampling_seed"], "fd": r["value"],
                             "checkpoint_sha256": r["checkpoint_sha256"]})
    return pd.DataFrame(rows).sort_values(["spec", "train_seed", "sampling_seed"])


def ci(low_high) -> str:
    return f"[{low_high[0]:.2f}, {low_high[1]:.2f}]"


def tables(frame: pd.DataFrame) -> str:
    one = ["| spec, sampling | checkpoints x seeds | mean FD | SD between checkpoints | SD within one checkpoint "
           "| SD of one value |", "|---|---|---|---|---|---|"]
    two = ["| spec, sampling | checkpoints x shared seeds | SD checkpoint | SD shared seed (p of no effect) "
           "| SD residual |", "|---|---|---|---|---|"]
    for spec, part in frame.groupby("spec"):
        counts = part.groupby("run").size()
        if counts.nunique() != 1 or counts.iloc[0] < 5:
            one.append(f"| {spec}, {ARMS[spec]} | incomplete: {counts.to_dict()} | | | | |")
            continue
        s = split_variance(part.groupby("run")["fd"].apply(list).tolist())  # each run's own five seeds
        one.append(f"| {spec}, {ARMS[spec]} | {s.checkpoints} x {s.seeds_per_checkpoint} | {s.mean:.2f} "
                   f"| {s.sd_between:.2f} {ci(s.sd_between_ci)} | {s.sd_within:.2f} {ci(s.sd_within_ci)} "
                   f"| {s.sd_total:.2f} |")
        wide = part[part["sampling_seed"].isin(SHARED)].pivot(index="run", columns="sampling_seed", values="fd")
        c = split_crossed(wide.to_numpy())
        two.append(f"| {spec}, {ARMS[spec]} | {c.checkpoints} x {c.seeds} | {c.sd_checkpoint:.2f} "
                   f"{ci(c.sd_checkpoint_ci)} | {c.sd_seed:.2f} {ci(c.sd_seed_ci)} (p = {c.seed_effect_p:.2g}) "
                   f"| {c.sd_residual:.2f} {ci(c.sd_residual_ci)} |")
    return "\n".join(["One-way (each checkpoint's five seeds as exchangeable):", *one, "",
                      "Two-way (the four seeds every checkpoint shares as a crossed factor):", *two])


if __name__ == "__main__":
    if len(sys.argv) > 1:
        HERE.mkdir(exist_ok=True)
        gather(Path(sys.argv[1])).to_csv(CSV, index=False)
    print(tables(pd.read_csv(CSV)))
