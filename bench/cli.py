"""The `bench` command: one entry point for the whole workflow (README.md).

    bench prepare [key=value ...]              images -> VAE latent moments + PCA'd semantic features
                  [--cluster P|--local|--debug]  ... as an encoding array + a PCA job after it
    bench train spec=redi [key=value ...]      one training run (resumes if its folder exists)
    bench grid NAME [--stage train|eval] ...   submit an ablation grid (SLURM, local, debug)
    bench status NAME                          what is queued, running, done, failed
    bench sample / bench eval RUN_DIR ...      samples and metrics with provenance
    bench export RUN_DIR --step N              those samples as the .npz ADM's evaluator reads
    bench report NAME                          tables beside the paper's numbers, plots
    bench import-official CKPT ...             a released checkpoint as a run folder
    bench perf ...                             throughput benchmarks
    bench weights [scale=paper] [--download]   the pretrained files a scale needs, checked
    bench rehearse --cluster P                 the paper scale's path in miniature on your cluster
    bench demo [--quick]                       the embedded default end to end, offline, on CPU

`python -m bench ...` runs the same command (bench/__main__.py). Every subcommand parses its own
arguments; errors the user can fix are printed as one line (`bench: error: ...`) with exit status
2, never as a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Callable, Sequence

from bench.config import ConfigError

# name -> (one-line help, "module:function" implementing it). Each module is imported only when its
# subcommand runs, so `bench --help` and `bench status` start without loading torch.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "prepare": ("images -> VAE latent moments and PCA-reduced semantic features (shards); --cluster P "
                "submits it as jobs", "bench.launch.prepare_jobs:main"),
    "train": ("train one run: bench train spec=redi [key=value ...]", "bench.train.loop:main"),
    "grid": ("submit an ablation grid: bench grid NAME [--stage train|eval] [--cluster P|--local|--debug] "
             "[--dry-run] [--list]", "bench.launch.submit:main_grid"),
    "status": ("state of every cell of a grid: bench status NAME (a prepare: bench status --prepare [key=value])",
               "bench.launch.submit:main_status"),
    "sample": ("sample images from a run folder with a chosen sampler and guidance",
               "bench.evaluate.score_run:main_sample"),
    "eval": ("evaluate a run's checkpoints (FD/FID and friends) with provenance",
             "bench.evaluate.score_run:main_eval"),
    "export": ("an evaluated step's samples as ADM's .npz: bench export RUN --step N",
               "bench.evaluate.export:main_export"),
    "sample-sweep": ("one picture of the same samples under several values of a setting (Fig. 8's w_r sweep)",
                     "bench.evaluate.sweep:main"),
    "report": ("tables in the paper's layout, convergence plots, speed-ups: bench report NAME",
               "bench.report.summary:main"),
    "import-official": ("a released SiT-ReDi checkpoint as a run folder: bench import-official CKPT "
                        "[--pca PCA --trust-pickle] [--grid NAME]", "bench.launch.import_official:main"),
    "perf": ("throughput benchmarks (training, sampling, prepare, evaluation)", "bench.perf.command:main"),
    "weights": ("the pretrained files a scale needs: present, verified, or how to fetch them: "
                "bench weights [scale=paper] [--download]", "bench.perf.weights:main"),
    "doctor": ("preflight on your node before GPU-days: bench doctor [--cluster P] [key=value ...]",
               "bench.perf.doctor:main"),
    "rehearse": ("the paper scale's path in miniature through your cluster, before GPU-days: bench rehearse "
                 "--cluster P [--workdir DIR]", "bench.rehearse.run:main"),
    "demo": ("the embedded default end to end on CPU, offline: bench demo [--quick]", "bench.demo.run:main"),
}


class UsageError(Exception):
    """An error the user can fix; printed without a traceback."""


def _resolve(target: str) -> Callable[[Sequence[str]], int]:
    module_name, func_name = target.split(":")
    return getattr(importlib.import_module(module_name), func_name)


def _is_user_error(err: Exception) -> bool:
    """Errors the user can fix: config errors, missing files, and by convention every ValueError
    subclass defined in bench/ (PrepareError, PCAError, PreparedDataError, ...), whose messages
    name the setting to change. Anything else is a bug and keeps its traceback."""
    if isinstance(err, (ConfigError, UsageError, FileNotFoundError)):
        return True
    return isinstance(err, ValueError) and type(err).__module__.startswith("bench.")


def _storage_fault(err: Exception) -> Exception:
    """A storage fault that reached the top outside bench.storage's writers (a library's own file,
    a folder made up front) as the same one-line StorageError; any other error unchanged."""
    from bench.storage import as_storage_error

    return as_storage_error(err) or err


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench",
        description="redi-bench: reproduce, extend and stress-test ReDi (joint image-feature diffusion).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `bench SUBCOMMAND --help` for the options of each subcommand.",
    )
    sub = parser.add_subparsers(dest="command", metavar="SUBCOMMAND")
    for name, (help_text, _) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in SUBCOMMANDS:
        parser.error(f"unknown subcommand {command!r}; choose one of {list(SUBCOMMANDS)}")
    # Before any subcommand imports huggingface_hub (which reads it once): weights come from local
    # files or the cache, and a missing one fails at once instead of retrying a download. The jobs
    # a subcommand starts inherit it. HF_HUB_OFFLINE=0 in the caller's environment still wins.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    func = _resolve(SUBCOMMANDS[command][1])
    try:
        return int(func(rest) or 0)
    except BrokenPipeError:
        return _reader_went_away()
    except Exception as err:
        err = _storage_fault(err)
        if not _is_user_error(err):
            raise
        print(f"bench {command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"bench {command}: interrupted", file=sys.stderr)
        return 130


def _reader_went_away() -> int:
    """stdout's reader closed the pipe (`bench grid ... | head`): end quietly, as `cat` would.

    Python would print a BrokenPipeError traceback, and another one when it flushes stdout at
    exit; pointing stdout at /dev/null first makes that last flush harmless (Python's docs, "Note
    on SIGPIPE"). 141 = 128 + SIGPIPE, the status a shell reports for a writer the pipe ended.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 141


if __name__ == "__main__":
    sys.exit(main())
