"""`bench export RUN --step N [--setting S] [--num-samples M] [--out FILE]`: the samples of one
evaluated (step, setting) as the `.npz` ADM's evaluator reads, to cross-check the harness's numbers
with guided-diffusion's TensorFlow `evaluations/evaluator.py`:

    arr_0   uint8 (N, H, W, 3), in sample order (shard 0 first), exactly N images: the setting's
            eval.num_samples, or M when asked (the shards of M must exist, `bench sample --num-samples M`)
    arr_1   int64 (N,) class labels, class-conditional runs only (as guided-diffusion's image_sample.py)

The samples are the ones `bench eval` scored under that setting (its eval.jsonl rows name the
sampling hash), never new ones: exporting samples nothing. The archive is streamed shard by shard
into a temporary file that is renamed into place, so a 50K batch (9.8 GB at 256 px) never sits in
memory and an interrupted export leaves no partial file.
"""

from __future__ import annotations

import argparse
import json
import sys
import zipfile
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from bench.atomic import atomic_write_with
from bench.evaluate.sampling import (
    SamplingError,
    read_shard,
    shard_counts,
    shard_is_finished,
    shard_path,
)
from bench.runfolder import SAMPLES_DIR, read_eval_rows, read_run_config


def _samples_folder(run_dir: Path, step: int, setting: str) -> tuple[Path, int, int]:
    """(folder, evaluated N, shard size) of the samples `bench eval` scored as (step, setting)."""
    rows = [r for r in read_eval_rows(run_dir) if int(r["step"]) == step]
    chosen = [r for r in rows if r.get("setting") == setting]
    if not chosen:
        recorded = sorted({str(r.get("setting")) for r in rows})
        raise SamplingError(f"{Path(run_dir) / 'eval.jsonl'} has no rows for step {step}, setting "
                            f"{setting!r} (settings evaluated at this step: {recorded}); run "
                            f"`bench eval {run_dir} --step {step} --setting {setting}` first")
    hashes = {r["setting_hash"] for r in chosen}
    if len(hashes) != 1:
        raise SamplingError(f"step {step}, setting {setting!r} has rows from several sample sets "
                            f"{sorted(hashes)}; eval.jsonl was edited by hand")
    folder = Path(run_dir) / SAMPLES_DIR / f"{step:07d}" / hashes.pop()
    plan_file = folder / "plan.json"
    if not plan_file.is_file():
        raise SamplingError(f"{folder} (the samples of step {step}, setting {setting!r}) is gone; "
                            f"run `bench eval {run_dir} --step {step} --setting {setting}` again")
    return folder, int(chosen[0]["n"]), int(json.loads(plan_file.read_text())["shard_size"])


def _npy_header(shape: tuple[int, ...], dtype: np.dtype) -> bytes:
    """The .npy 1.0 header (magic included) of a C-order array, for writing its bytes after it."""
    import io

    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                  "fortran_order": False, "shape": shape})
    return buffer.getvalue()


def export_samples(run_dir: Path, step: int, setting: str = "default", out: Optional[Path] = None,
                   num_samples: Optional[int] = None) -> tuple[Path, tuple[int, ...]]:
    """Write the samples of (step, setting) as ADM's .npz (module docstring); returns its path
    (default: `<run_dir>/samples/<step>/<hash>/samples_<N>x<H>x<W>x3.npz`) and arr_0's shape."""
    run_dir = Path(run_dir)
    folder, evaluated, shard_size = _samples_folder(run_dir, int(step), setting)
    count = int(num_samples if num_samples is not None else evaluated)
    counts = shard_counts(count, shard_size) if count >= 1 else []
    missing = [i for i, n in enumerate(counts) if not shard_is_finished(shard_path(folder, i), n)]
    if count < 1 or missing:
        raise SamplingError(f"{folder} does not hold the {count} samples asked for (missing or "
                            f"other-sized shards {missing[:5]}); evaluated: {evaluated}. Export at "
                            f"most those, or run `bench sample {run_dir} --step {step} --num-samples "
                            f"{count}` with the same eval settings first")
    first = read_shard(shard_path(folder, 0))["images"]
    shape = (count, *first.shape[1:])
    conditional = read_run_config(run_dir).model.conditional
    out = Path(out) if out is not None else folder / f"samples_{'x'.join(map(str, shape))}.npz"

    def write(tmp: str) -> None:
        # np.savez layout (a ZIP of .npy members, stored, ZIP64 for > 4 GB) written member by
        # member: arr_0 streams the shards' images (each shard read once), arr_1 their labels.
        labels = []
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
            with archive.open("arr_0.npy", "w", force_zip64=True) as member:
                member.write(_npy_header(shape, np.uint8))
                for index in range(len(counts)):
                    shard = read_shard(shard_path(folder, index))
                    member.write(np.ascontiguousarray(shard["images"], dtype=np.uint8).tobytes())
                    labels.append(shard["labels"].astype(np.int64))
            if conditional:
                labels = np.concatenate(labels)
                with archive.open("arr_1.npy", "w", force_zip64=True) as member:
                    member.write(_npy_header(labels.shape, np.int64) + labels.tobytes())

    images_and_labels = int(np.prod(shape)) + 8 * count  # what a full disk's message says is needed
    return atomic_write_with(out, write, needed=images_and_labels), shape


def main_export(argv: Optional[Sequence[str]] = None) -> int:
    """`bench export RUN_DIR --step N [--setting NAME] [--num-samples M] [--out FILE]`."""
    parser = argparse.ArgumentParser(
        prog="bench export", description="Write the samples of an evaluated (step, setting) as the "
        ".npz ADM's evaluator reads (arr_0 uint8 NHWC; arr_1 labels for conditional runs).")
    parser.add_argument("run_dir", type=Path, help="a run folder written by `bench train`")
    parser.add_argument("--step", type=int, required=True, metavar="N", help="checkpoint step")
    parser.add_argument("--setting", default="default", help="the --setting name given to bench eval")
    parser.add_argument("--num-samples", type=int, default=None, metavar="M",
                        help="export M images (default: as many as were evaluated)")
    parser.add_argument("--out", type=Path, default=None, help="output .npz (default: in the samples folder)")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))

    # Errors (SamplingError: nothing evaluated under that name, shards missing) reach `bench`'s
    # entry point, which prints them as one line with exit status 2.
    path, shape = export_samples(args.run_dir, args.step, args.setting, args.out, args.num_samples)
    print(f"export: {path} (arr_0 uint8 {shape}); cross-check with guided-diffusion: "
          f"python evaluations/evaluator.py VIRTUAL_imagenet256_labeled.npz {path}")
    return 0
