"""`bench import-official CKPT`: a released SiT-ReDi checkpoint as a run folder.

    bench import-official SiT-ReDi-XL-2.pt --pca dino_pca_model.pth --trust-pickle \
        --grid readme_checkpoint data.prepared_dir=/data/prepared-imagenet

With `--grid NAME` the checkpoint becomes the grid's (only, or `--cell`) run: its folder, config and
length, so `bench grid NAME --stage eval` scores it and `bench report NAME` sets it beside the
published numbers (the grid's train stage finds the run finished). Without a grid the config is the
paper scale plus what the weights say (size, r, learn_sigma, REPA projector) plus the overrides, in
`results/runs/official/`. `bench sample`, `bench eval` and `bench export` then work on the folder
like on any trained run. The file is read with torch.load(weights_only=True); the PCA file is an
sklearn pickle and is read only with --trust-pickle.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Sequence

from bench.compose import load_config
from bench.config import ConfigError
from bench.launch import grids
from bench.run_hash import run_dir as identity_run_dir
from bench.train.released_checkpoints import (
    OfficialImportError,
    extract_official_weights,
    import_official_run,
    official_overrides,
    read_official_file,
)


def _step_from_name(path: Path) -> int | None:
    digits = re.fullmatch(r"0*(\d+)", path.stem)
    return int(digits.group(1)) if digits else None


def resolve_target(args: argparse.Namespace, obj: dict):
    """(config, run folder, step) from --grid/--cell or from the paper scale + the weights."""

    ckpt = Path(args.checkpoint)
    if args.grid:
        every = grids.expand(grids.load_grid(args.grid, *([args.grids_dir] if args.grids_dir else [])))
        cells = [c for c in every if c.name == args.cell] if args.cell else every
        if len(cells) != 1:
            names = [c.name for c in every]
            found = "no cell " + repr(args.cell) if args.cell else f"{len(names)} cells"
            raise ConfigError(f"grid {args.grid} has {found}; pick one with --cell (cells: {names})")
        cell = cells[0]
        cfg = cell.cfg
        if args.overrides:
            cfg = load_config([*cell.overrides, *args.overrides])
        step = args.step or cfg.train.max_steps
        return cfg, Path(args.out) if args.out else identity_run_dir(cfg), step
    step = args.step or _step_from_name(ckpt)
    if step is None:
        raise ConfigError(f"cannot tell the training step of {ckpt.name}; pass --step N")
    try:
        inferred = official_overrides(extract_official_weights(obj), num_heads=args.num_heads)
    except ValueError as err:
        raise OfficialImportError(f"{ckpt}: {err}") from None
    cfg = load_config([f"scale={args.scale}", "grid=official", *inferred, f"train.max_steps={step}",
                       *args.overrides])
    return cfg, Path(args.out) if args.out else identity_run_dir(cfg), step


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench import-official", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", metavar="CKPT", help="official .pt/.pth (or .safetensors)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    parser.add_argument("--pca", help="ReDi's pcs/dino_pca_model.pth, stored beside the checkpoint "
                        "and compared with the prepared data's PCA (needs --trust-pickle)")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="allow unpickling the PCA file (it can run code: only trusted files)")
    parser.add_argument("--grid", help="put the checkpoint into this grid's run (e.g. readme_checkpoint)")
    parser.add_argument("--grids-dir", help=argparse.SUPPRESS)
    parser.add_argument("--cell", help="the grid's cell, when it has several")
    parser.add_argument("--step", type=int, help="training step (default: the grid's length, or the "
                        "digits of the file name as in 3000000.pt)")
    parser.add_argument("--num-heads", type=int, help="attention heads, for widths outside Table 7")
    parser.add_argument("--out", help="run folder (default: the config's own folder)")
    parser.add_argument("--scale", default="paper", help="the scale the config starts from, without "
                        "--grid (default: %(default)s; tests use embedded)")
    args = parser.parse_intermixed_args(list(sys.argv[1:] if argv is None else argv))

    obj = read_official_file(args.checkpoint)
    cfg, run_dir, step = resolve_target(args, obj)
    import_official_run(args.checkpoint, cfg, run_dir, step, pca=args.pca,
                        trust_pickle=args.trust_pickle, obj=obj)
    print(f"import-official: {args.checkpoint} -> {run_dir} (step {step}, spec {cfg.spec}, "
          f"model {cfg.model.size}); next: bench eval {run_dir} --step {step}")
    return 0
