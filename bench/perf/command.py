"""`bench perf`: throughput of training, sampling, prepare and evaluation, with a targets report.

    bench perf [--size S/2|custom:DEPTH,WIDTH,HEADS,PATCH] [--batch 16] [--specs latent_only,redi,...]
               [--kinds train,sample,prepare,eval] [--repeats 5] [--warmup 2] [--data synthetic|real]
               [--precision auto|bf16|fp32] [--compile] [--out results/perf] [--quick]
               [--official PATH] [--ladder] [--roofline/--no-roofline] [--table6-steps 250 --table6-batch 64]

Every workload gets a burn-in (`--warmup` calls; the last one also sizes a repeat to at least
`--min-repeat-seconds`), then `--repeats` timed repeats, interleaved across the workloads of a kind
(bench/perf/timing.py). Results: one JSON row per workload in `<out>/<run>.jsonl` (images/s median,
IQR, min, max, repeats, peak memory, device, CPU, threads, precision, versions, git commit, command,
created_at), the checked targets in `<out>/<run>.targets.json`, and a printed table followed by a
`targets` section with PASS/FAIL and the measured ratio of each target (bench/perf/targets.py).

Rows with `kind: train` and `mode: default` are what `bench grid --dry-run` turns into GPU-hours.
`--official PATH` (your checkout of https://github.com/zelaki/ReDi) adds a row `official`: the
official training step, timed round-robin with the default step in the same run, with a loss check
(bench/perf/official_step.py); speed-ups are only ever ratios of two rows of one run. `--ladder` adds
one row per optimisation between the official-style step and the default (no checkpointing, fused
AdamW, then torch.compile), so each one's gain is measured. Every training row carries its model
FLOPs per image, achieved GFLOP/s and share of this machine's matmul peak (bench/perf/roofline.py).
`--kinds table6` times finished images (the paper's Appendix B: 250 sampling steps at batch 64,
VAE decode included) for the Table 6 cells among --specs (latent_only, redi, redi_separate).

The official-style reference rows carry `spec: reference` / `reference_precomputed` (and
`reference_of`: the spec they mirror), so they never pass for a spec of a grid.

Modules: setup (sizes, specs, precision, data), training (the default step from bench/train/step.py,
the reference mode, loss agreement), official (--official), roofline (matmul peak, model FLOPs),
infer (sampling, Table 6, prepare, eval), timing (timing, provenance), run (orchestration),
targets (targets, table).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Optional, Sequence

import torch

from bench.perf.run import DEFAULT_KINDS, KINDS, run_perf
from bench.perf.setup import DEFAULT_SPECS, PerfError

QUICK = dict(size="custom:2,64,2,1", batch=4, repeats=3, warmup=1, min_repeat_seconds=0.05,
             table6_steps=2, table6_batch=2, compile=False)


def build_parser() -> argparse.ArgumentParser:
    """The options of `bench perf` (see the module docstring)."""
    p = argparse.ArgumentParser(prog="bench perf", description="Throughput benchmarks with a targets report.")
    p.add_argument("--size", default=None, metavar="S/2|custom:D,W,H,P",
                   help="model size (default: the scale's configured model)")
    p.add_argument("--scale", choices=("embedded", "paper"), default=None,
                   help="data/VAE/encoder shapes (default: embedded for custom sizes, paper otherwise)")
    p.add_argument("--batch", type=int, default=None, help="training batch (default: the scale's train.batch_size)")
    p.add_argument("--sample-batch", type=int, default=None, help="sampling batch (default: --batch)")
    p.add_argument("--encoder-batch", type=int, default=None, help="prepare/eval batch (default: --batch)")
    p.add_argument("--specs", default=",".join(DEFAULT_SPECS), help="comma-separated specs")
    p.add_argument("--reference", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the official-style reference mode of --reference-spec")
    p.add_argument("--reference-spec", default="redi")
    p.add_argument("--kinds", default=",".join(DEFAULT_KINDS),
                   help=f"comma-separated subset of {','.join(KINDS)} (table6 only when asked: it samples "
                        "whole images)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--min-repeat-seconds", type=float, default=0.5,
                   help="calls per repeat are chosen so that a repeat lasts at least this long")
    p.add_argument("--interleave", action=argparse.BooleanOptionalAction, default=True,
                   help="time the workloads of a kind round-robin (all resident in memory); "
                        "--no-interleave builds, times and frees them one by one (large models)")
    p.add_argument("--data", choices=("synthetic", "real"), default="synthetic")
    p.add_argument("--prepared-dir", default="results/prepared", help="the prepared folder for --data real")
    p.add_argument("--data-root", default=None, help="the images for --data real (reference mode, prepare)")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default=None,
                   help="default training path (default: the config's train.precision, as bench train "
                        "runs it; auto = bf16 autocast on a GPU with bf16 or a CPU with AMX-BF16). Sampling "
                        "runs in eval.precision and prepare's encoder in encoder.precision, as bench "
                        "sample and bench prepare resolve them (--set eval.precision=fp32 to change)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the default path (default: as bench train resolves the config's "
                        "train.compile; auto compiles on a CPU for runs of 500 steps or more)")
    p.add_argument("--official", default=None, metavar="PATH",
                   help="a checkout of the official ReDi code: time its training step beside the default")
    p.add_argument("--ladder", action="store_true",
                   help="one extra row per optimisation from the reference mode to the default (+ compile)")
    p.add_argument("--roofline", action=argparse.BooleanOptionalAction, default=True,
                   help="measure the matmul peak (fp32, bf16) and print each training row's share of it")
    p.add_argument("--profile", action="store_true",
                   help="after timing, profile each training row (CPU) and print where its time goes "
                        "(bench/perf/profile.py)")
    p.add_argument("--table6-steps", type=int, default=250, help="sampling steps of a --kinds table6 image")
    p.add_argument("--table6-batch", type=int, default=64, help="batch of --kinds table6 (paper: 64)")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing on the default path")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads before measuring")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config override applied to every spec (repeatable)")
    p.add_argument("--out", default="results/perf")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--strict", action="store_true", help="exit with status 1 when a target FAILs")
    p.add_argument("--quick", action="store_true",
                   help=f"CI run: size {QUICK['size']}, batch {QUICK['batch']}, {QUICK['repeats']} repeats, "
                        f"{QUICK['warmup']} warm-up, eager (explicit --size/--batch/--compile still win)")
    return p


def _device(text: str) -> torch.device:
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise PerfError(f"--device {text!r} is not a device; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PerfError("--device cuda but no CUDA device is visible; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise PerfError(f"--device {text!r}: only cpu and cuda are supported")
    return device


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parse and validate; --quick fills what was not given explicitly."""
    parser = build_parser()
    args = parser.parse_args(list(argv))
    if args.quick:
        for key, value in QUICK.items():
            if key in ("size", "batch") and getattr(args, key) is not None:
                continue
            if key not in ("size", "batch") and {f"--{key.replace('_', '-')}", f"--no-{key}"} & set(argv):
                continue
            setattr(args, key, value)
    for option in ("batch", "sample_batch", "encoder_batch", "repeats", "threads", "table6_steps", "table6_batch"):
        value = getattr(args, option)
        if value is not None and value < 1:
            raise PerfError(f"--{option.replace('_', '-')} must be >= 1, got {value}")
    if args.warmup < 0:
        raise PerfError(f"--warmup must be >= 0, got {args.warmup}")
    if args.profile and args.device != "cpu" and not (args.device == "auto" and not torch.cuda.is_available()):
        raise PerfError("--profile sums CPU time per operator, which on a GPU is launch time, not the kernels': "
                        "use it with --device cpu (on a GPU, torch.profiler with ProfilerActivity.CUDA)")
    if args.profile and not args.interleave:
        raise PerfError("--profile profiles the training rows after timing them, which --no-interleave has "
                        "already freed: drop --no-interleave")
    if args.min_repeat_seconds < 0:
        raise PerfError(f"--min-repeat-seconds must be >= 0, got {args.min_repeat_seconds}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of `bench perf` (bench/cli.py routes here)."""

    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run_perf(args, _device(args.device), "bench perf " + shlex.join(argv))
    print(result["report"])
    print(f"\nwrote {result['jsonl']}\n  and {result['targets_file']}")
    if args.strict and result["failed"]:
        print(f"bench perf: {len(result['failed'])} target(s) failed (--strict)", file=sys.stderr)
        return 1
    return 0
