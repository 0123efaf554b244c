"""`bench sample-sweep RUN --step N --key K --values V ...`: one picture of the same samples under
several values of one sampling setting (paper Fig. 8: DiT-XL/2 w/ ReDi at 400K without RG and with
w_r = 1.1 ... 1.6).

Every value samples the same images: a shard's labels and initial noise depend only on eval.seed
and the shard index (bench.evaluate.sampling), not on the guidance, so column j shows one class and
one starting noise in every row and only the setting changes, as in the paper's figure. Rows are
the values in the order given; the samples stay in the run folder like any `bench sample` output.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from bench.atomic import atomic_write_bytes
from bench.evaluate.sampling import sample


def sweep_images(run_dir: Path, step: Optional[int], key: str, values: Sequence[str],
                 num_samples: int, overrides: Sequence[str] = (), device=None,
                 progress: bool = False) -> tuple[list[np.ndarray], np.ndarray]:
    """Per value, the first `num_samples` images (uint8 N,H,W,3) of the run at `step`, and the labels
    (the same for every value)."""

    rows, labels = [], None
    for value in values:
        result = sample(Path(run_dir), step, overrides=[*overrides, f"{key}={value}"],
                        num_samples=num_samples, device=device, progress=progress)
        images, shard_labels = [], []
        for path in result.shards:
            with np.load(path, allow_pickle=False) as npz:
                images.append(npz["images"])
                shard_labels.append(npz["labels"])
        rows.append(np.concatenate(images)[:num_samples])
        mine = np.concatenate(shard_labels)[:num_samples]
        if labels is not None and not np.array_equal(labels, mine):
            raise RuntimeError("the sweep's rows were sampled with different labels; bench.evaluate."
                               "sampling must seed labels independently of the guidance")
        labels = mine
    return rows, labels


def sweep_figure(rows: Sequence[np.ndarray], row_labels: Sequence[str], path: Path,
                 title: str = "") -> Path:
    """A grid: one row per value (labelled on the left), one column per sample; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    n_rows, n_cols = len(rows), len(rows[0])
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.2 * n_cols + 1, 1.2 * n_rows + 0.4),
                             squeeze=False)
    for r, (images, label) in enumerate(zip(rows, row_labels)):
        for c in range(n_cols):
            ax = axes[r][c]
            ax.imshow(images[c])
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r][0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(Path(path), buffer.getvalue())
    return Path(path)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="bench sample-sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    parser.add_argument("overrides", nargs="*", metavar="eval.key=value")
    parser.add_argument("--step", type=int, default=None, help="checkpoint (default: the latest)")
    parser.add_argument("--key", default="eval.guidance.rg_scale", help="default: %(default)s")
    parser.add_argument("--values", nargs="+", default=["1.0", "1.1", "1.2", "1.3", "1.4", "1.5", "1.6"],
                        help="one row each (default: Fig. 8's no RG and w_r = 1.1 ... 1.6)")
    parser.add_argument("--num-samples", type=int, default=8, help="columns (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=None,
                        help="PNG (default: RUN_DIR/figures/sweep-<key>-<step>.png)")
    parser.add_argument("--device", default=None)
    args = parser.parse_intermixed_args(list(sys.argv[1:] if argv is None else argv))
    # errors the user can fix (SamplingError, ConfigError: ValueErrors of bench/) are printed by bench.cli
    def body() -> int:
        rows, _ = sweep_images(args.run_dir, args.step, args.key, args.values, args.num_samples,
                               args.overrides, args.device)
        name = args.key.split(".")[-1]
        labels = [f"{name}={v}" + (" (none)" if name.endswith("_scale") and float(v) == 1.0 else "")
                  for v in args.values]
        step = args.step if args.step is not None else "latest"
        out = args.out or args.run_dir / "figures" / f"sweep-{name}-{step}.png"
        sweep_figure(rows, labels, out, f"{args.run_dir.name} at step {step}: {args.key}")
        print(f"sample-sweep: {len(rows)} rows x {args.num_samples} samples -> {out}")
        return 0

    return body()
