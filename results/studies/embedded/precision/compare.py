"""The demo's FD in bf16 against fp32 on the same paired seeds: does switching the embedded default
to bf16 (training and sampling; scale=embedded's precision auto) cost anything beyond seed noise?

Both arms are the `demo` grid (three paired seeds per spec, 600 steps, the same prepared data, the
same evaluation seeds); only train.precision and eval.precision differ. Arm bf16 is `bench demo` on
a fresh clone (auto resolves to bf16 on the AMX Xeon); arm fp32 is

    bench grid demo --local train.precision=fp32 eval.precision=fp32 \
        output_root=FP32_RUNS data.prepared_dir=PREPARED

Each (spec, seed, sampling setting, step) is one pair: the same data order, diffusion times, noise
and evaluation noise in both arms. The paired difference bf16 - fp32 is summarised per spec and
setting (3 pairs) and over all of them (the RG setting shares its checkpoints with redi_rg's plain
one, so the pooled pairs are not all independent; the per-spec lines are the ones to read).

    PYTHONPATH=$PWD python results/studies/embedded/precision/compare.py [--csv NAME] [BF16_RUNS FP32_RUNS]

Without arguments the checked-in fd_by_precision.csv is read. Prints the tables README.md shows.

With --arms NEW,BASE the two run folders are other arms than bf16 and fp32 (the first is measured
against the second), e.g. `--csv fd_by_compile.csv --arms compiled,eager COMPILED_RUNS EAGER_RUNS`:
the demo grid trained with train.compile=true against the same grid trained eager.

With --csv NAME the table is another study's (a file in this folder): fd_by_prepare_*.csv compare
prepared data instead, BF16_RUNS trained on a folder `bench prepare` made with some of its networks
in bf16 and FP32_RUNS on one made in fp32, training and sampling in bf16 in both. The same seeds then
draw the same data order and noise over different latents or features, so a pair shares its
randomness, not its data.
"""

import json
import sys
from pathlib import Path

import pandas as pd

from bench.report.stats import mean_ci95, paired_t_p

HERE = Path(__file__).resolve().parent
CSV = HERE / "fd_by_precision.csv"
METRIC = "fd_classifier"


def gather(runs: Path, arm: str) -> pd.DataFrame:
    """One row per FD value of the demo grid's run folders under `runs`, labelled `arm`."""
    rows = []
    for run in sorted(p for p in runs.iterdir() if (p / "eval.jsonl").is_file()):
        config = json.loads((run / "config.json").read_text())
        for line in (run / "eval.jsonl").read_text().splitlines():
            r = json.loads(line)
            if r["metric"] == METRIC:
                rows.append({"arm": arm, "spec": config["spec"], "seed": config["train"]["seed"],
                             "setting": r["setting"], "step": r["step"], "fd": r["value"],
                             "sampled_in": r["precision"], "run": run.name})
    return pd.DataFrame(rows)


def fmt(mean: float, half: float) -> str:
    return f"{mean:+.2f} [{mean - half:+.2f}, {mean + half:+.2f}]"


def table(frame: pd.DataFrame, arms: tuple[str, str] = ("bf16", "fp32")) -> str:
    new, base = arms
    wide = frame.pivot_table(index=["spec", "setting", "step", "seed"], columns="arm", values="fd").dropna()
    wide["diff"] = wide[new] - wide[base]
    lines = [f"| spec | sampling | step | pairs | FD {base} (mean) | FD {new} (mean) | {new} - {base} [95% CI] | p |",
             "|---|---|---|---|---|---|---|---|"]
    groups = [((spec, setting, step), part) for (spec, setting, step), part
              in wide.groupby(level=["spec", "setting", "step"])]
    groups += [(("all", "all", step), part) for step, part in wide.groupby(level="step")]
    for (spec, setting, step), part in groups:
        mean, half, n = mean_ci95(part["diff"])
        lines.append(f"| {spec} | {setting} | {step} | {n} | {part[base].mean():.2f} | {part[new].mean():.2f} "
                     f"| {fmt(mean, half)} | {paired_t_p(part['diff']):.2f} |")
    seed_sd = wide.groupby(level=["spec", "setting", "step"])[base].std().mean()
    note = f"SD of FD between the three seeds within a cell ({base} arm, mean over cells): {seed_sd:.2f}"
    return "\n".join(lines) + "\n\n" + note


def main(argv: list[str]) -> None:
    csv, arms = CSV, ("bf16", "fp32")
    while argv[:1] in (["--csv"], ["--arms"]):
        if argv[0] == "--csv":
            csv = HERE / argv[1]
        else:
            arms = tuple(argv[1].split(","))
        argv = argv[2:]
    if argv:
        frame = pd.concat([gather(Path(argv[0]), arms[0]), gather(Path(argv[1]), arms[1])], ignore_index=True)
        frame.sort_values(["spec", "setting", "step", "seed", "arm"]).to_csv(csv, index=False)
    frame = pd.read_csv(csv).rename(columns={"precision": "arm"})  # the first studies' CSVs say precision
    print(table(frame, arms))


if __name__ == "__main__":
    main(sys.argv[1:])
