"""Training throughput of two arms of the demo grid, from their run folders' metrics.jsonl: the
median images/s of each run's logged intervals (the first, which holds torch.compile's compile,
left out) and its wall time to the last step, as a JSON record.

    PYTHONPATH=$PWD python results/studies/embedded/precision/train_speed.py OUT.json NEW=RUNS BASE=RUNS

The two arms ran at different times on a shared VM, so compare them to about 10%.
"""

import json
import statistics
import sys
from pathlib import Path


def arm(runs: Path) -> list[dict]:
    rows = []
    for run in sorted(p for p in runs.iterdir() if (p / "metrics.jsonl").is_file()):
        logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
        config = json.loads((run / "config.json").read_text())
        rows.append({"run": run.name, "spec": config["spec"], "seed": config["train"]["seed"],
                     "compile": config["train"]["compile"], "steps": logged[-1]["step"],
                     "images_per_s": round(statistics.median(r["images_per_s"] for r in logged[1:]), 1),
                     "wall_s": round(logged[-1]["elapsed_s"], 1)})
    return rows


def main(argv: list[str]) -> None:
    out, arms = Path(argv[0]), dict(a.split("=", 1) for a in argv[1:])
    record = {name: arm(Path(runs)) for name, runs in arms.items()}
    Path(out).write_text(json.dumps(record, indent=1) + "\n")
    for name, rows in record.items():
        print(f"{name}: images/s {min(r['images_per_s'] for r in rows)}-{max(r['images_per_s'] for r in rows)}, "
              f"wall per run {min(r['wall_s'] for r in rows)}-{max(r['wall_s'] for r in rows)} s, "
              f"{sum(r['wall_s'] for r in rows):.0f} s summed")


if __name__ == "__main__":
    main(sys.argv[1:])
