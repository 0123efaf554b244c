"""`bench rehearse [--cluster PROFILE | --local] [--workdir DIR]`: the paper scale's path, in miniature,
on the cluster you will use, before spending GPU-days.

It writes a folder a cluster user would have (bench.rehearse.assets: generated ImageNet-layout
JPEGs, SD-VAE, DINOv2-B/14-reg and Inception of the paper's architectures with random weights, an
ADM-layout reference batch; in its user folder `redi-bench`, a `site.yaml` naming them once and a
grid `table1`, the paper's Table 1 specs at a miniature size with two paired seeds) and then runs, from that
folder, the commands the README gives for the real thing:

    bench weights scale=paper
    bench prepare scale=paper <sizes> --cluster P       (an encoding array, then the PCA job)
    bench grid table1 --cluster P                       (training, one array)
    bench grid table1 --stage eval --cluster P          (FID, sFID, IS, precision, recall)
    bench status table1
    bench report table1
    bench export RUN --step N

waiting for each stage's jobs as a user would watch `bench status`. Everything is the paper
scale's code (scale=paper, its SD-VAE/DINOv2/Inception loaders, ADM's metrics, the launcher's
arrays) except the sizes: the image count, the model (custom, width 32, depth 2), the steps and the
sample count. `rehearsal.json` in the folder records each command, its exit status and seconds.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from bench.atomic import atomic_write_json, atomic_write_text
from bench.config import ConfigError
from bench.rehearse import assets

# What differs from the paper: sizes only. The prepare's share of them (the grid's base repeats it,
# so every cell reads the folder this prepare writes).
PREPARE_SIZES = ("data.num_classes=3", "encoder.pca_fit_images=4")
PREPARE_OPTIONS = ("--shard-size", "2", "--batch-size", "2", "--max-images", "test=2")
STEPS = 4

SITE = """\
# The rehearsal's paths, said once (bench rehearse wrote this file; relative to this folder).
# On your cluster the same keys name the real files: `bench weights scale=paper` lists them.
data:
  root: ../assets/imagenet                # train/<wnid>/*.JPEG, val/<wnid>/*.JPEG
  prepared_dir: ../prepared/in256-mini
vae:
  path: ../assets/sd-vae-ft-ema           # a diffusers AutoencoderKL folder
encoder:
  weights: ../assets/dinov2_vitb14_reg4_pretrain.pth
eval:
  inception_weights: ../assets/pt_inception-2015-12-05.pth
  reference: ../assets/VIRTUAL_imagenet256_labeled.npz
output_root: ../runs
"""

GRID = f"""\
# Table 1 in miniature, for `bench rehearse`: the paper's specs (latent only, REPA, ReDi; SiT, flow
# transport, SDE sampler) on the paper scale, at a size that runs on CPU in minutes. Only sizes
# differ from ablations/grids/table1.yaml: images, model, steps, samples. Numbers mean nothing.
name: table1
title: "Table 1 in miniature (bench rehearse): latent only vs REPA vs ReDi, two paired seeds"
regenerates: [table1]
base: [scale=paper, {", ".join(PREPARE_SIZES)}, model.size=custom, model.hidden_size=32, model.depth=2,
       model.num_heads=2, model.patch_size=2, objective.align_layer=1, objective.projector_hidden=32,
       optim.lr=1.0e-3, train.batch_size=4, train.max_steps={STEPS}, train.ckpt_every=2, train.log_every=1,
       train.ema_decay=0.5]
specs: [latent_only, repa, redi]
seeds: {{paired: [0, 1]}}
eval:
  steps: [{STEPS}]
  # 4 samples, 2 sampling steps: precision/recall's k-NN needs more than 3 points; FID of 4 samples
  # in 2048 dimensions is rank-deficient, which a rehearsal accepts and a result never should.
  overrides: [eval.num_samples=4, eval.num_sampling_steps=2, eval.batch_size=4, eval.allow_rank_deficient=true]
  settings:
    - {{name: no_cfg, overrides: [eval.guidance.cfg_scale=1.0]}}
resources: {{gpus_per_node: 0, nodes: 1, hours: 1}}
baseline: latent_only
"""


class RehearsalError(ConfigError):
    """A stage of the rehearsal failed; the message names the command and where its log is."""


def write_folder(workdir: Path) -> dict[str, Path]:
    """The assets, and in the user folder `workdir/redi-bench` the site file and the grid table1."""
    paths = assets.write_all(workdir)
    user = workdir / "redi-bench"
    (user / "grids").mkdir(parents=True, exist_ok=True)
    atomic_write_text(user / "site.yaml", SITE)
    atomic_write_text(user / "grids" / "table1.yaml", GRID)
    return paths


class Runner:
    """Runs `bench ...` in the rehearsal folder as a user would, and records each command."""

    def __init__(self, workdir: Path, say: Callable[[str], None] = print) -> None:
        self.workdir, self.say, self.steps = workdir, say, []
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1",
                    # the jobs' logs: a plain progress line every 10 s (SLURM passes the environment on)
                    "REDI_BENCH_PROGRESS_EVERY": os.environ.get("REDI_BENCH_PROGRESS_EVERY", "10"),
                    # this folder's site.yaml and grids first; the user's own folders (profiles) still follow
                    "REDI_BENCH_PATH": os.pathsep.join(filter(None, [str(workdir / "redi-bench"),
                                                                     os.environ.get("REDI_BENCH_PATH")]))}

    def bench(self, *args: str, ok: Sequence[int] = (0,)) -> subprocess.CompletedProcess:
        command = ["bench", *args]
        self.say(f"\n$ {shlex.join(command)}")
        began = time.time()
        proc = subprocess.run([sys.executable, "-m", "bench", *args], cwd=self.workdir, env=self.env,
                              text=True, capture_output=True)
        self.say((proc.stdout + proc.stderr).rstrip())
        self.steps.append({"command": shlex.join(command), "exit": proc.returncode,
                           "seconds": round(time.time() - began, 1)})
        if proc.returncode not in ok:
            raise RehearsalError(f"`{shlex.join(command)}` exited with {proc.returncode}: "
                                 f"{(proc.stderr.strip().splitlines() or ['no output'])[-1]}")
        return proc

    def wait(self, what: str, poll: Callable[[], Optional[str]], timeout: float, every: float = 3.0) -> None:
        """Call `poll` until it returns "" (finished) or an error text; RehearsalError on error/timeout."""
        began = time.time()
        while time.time() - began < timeout:
            problem = poll()
            if problem is not None:
                self.steps.append({"command": f"(wait for {what})", "exit": 0 if not problem else 1,
                                   "seconds": round(time.time() - began, 1)})
                if problem:
                    raise RehearsalError(f"{what}: {problem}")
                return
            time.sleep(every)
        raise RehearsalError(f"{what}: not finished after {timeout:.0f} s (bench status shows where it is)")


# ----------------------------------------------------------------------------------------------
# What "finished" means for each stage (read in this process, as `bench status` reads it)


def prepare_done(prepared_dir: str) -> Optional[str]:
    """"" once manifest.json is written, the failure once a job failed, None while it runs."""
    from bench.launch.prepare_jobs import prepare_status

    status = prepare_status(prepared_dir)
    if status["complete"]:
        return ""
    bad = [j for j in status["jobs"] if j["state"] in ("failed", "cancelled", "timeout")]
    return "; ".join(f"{j['job']} {j['state']}: {j['detail']} (log {j['stderr']})" for j in bad) or None


def grid_done(stage: str) -> Optional[str]:
    """"" when every cell of table1 is trained (stage train) or measured (eval); the failures; None."""
    from bench.launch.status import grid_status

    rows = grid_status("table1")
    if stage == "train":
        bad = [f"{r['cell']}: {r['detail']} (log {r['log']})" for r in rows if r["state"] in ("failed", "cancelled",
                                                                                              "timeout")]
        return "; ".join(bad) if bad else ("" if all(r["state"] == "done" for r in rows) else None)
    bad = [f"{r['cell']}: {e}" for r in rows for e in r["eval_errors"]]
    if bad:
        return "; ".join(bad)
    measured = [r["eval"].split(" ", 1)[0].split("/") for r in rows if r["eval"]]
    return "" if len(measured) == len(rows) and all(a == b for a, b in measured) else None


def weights_present(overrides: Sequence[str]) -> list[str]:
    """The keys of the pretrained files scale=paper needs that `bench weights` finds missing."""
    from bench.compose import load_config
    from bench.perf.weights import check, default_registry

    cfg = load_config(overrides)
    return [s.need.key for s in check(cfg, default_registry(cfg)) if not s.present]


# ----------------------------------------------------------------------------------------------
# The rehearsal


def rehearse(workdir: Path, where: Sequence[str], timeout_s: float = 3600, say: Callable[[str], None] = print) -> dict:
    """Write the folder, then run every stage's command in it and wait for its jobs; a
    RehearsalError names the first stage that failed. Returns what `rehearsal.json` records."""
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    began = time.time()
    say(f"rehearse: writing the miniature's files in {workdir} (generated images, random weights)")
    write_folder(workdir)
    runner = Runner(workdir, say)
    runner.steps.append({"command": "(write the miniature's files)", "exit": 0,
                         "seconds": round(time.time() - began, 1)})
    previous = (Path.cwd(), os.environ.get("REDI_BENCH_PATH"))
    os.chdir(workdir)  # this process reads the same site.yaml and grids as the commands it runs
    os.environ["REDI_BENCH_PATH"] = runner.env["REDI_BENCH_PATH"]
    record = {"workdir": str(workdir), "where": list(where), "steps": runner.steps, "export": None,
              "failed": None}
    try:
        record["export"] = _stages(runner, list(where), timeout_s)
    except RehearsalError as err:
        record["failed"] = str(err)
        raise
    except Exception as err:  # any other failure is recorded as one too, never as a success
        record["failed"] = f"{type(err).__name__}: {err}"
        raise
    finally:
        os.chdir(previous[0])
        if previous[1] is None:
            os.environ.pop("REDI_BENCH_PATH", None)
        else:
            os.environ["REDI_BENCH_PATH"] = previous[1]
        record["seconds"] = round(time.time() - began, 1)  # written whether a stage failed or not
        atomic_write_json(workdir / "rehearsal.json", record)
    return record


def _stages(runner: Runner, where: list[str], timeout_s: float) -> str:
    """Every command a cluster user runs, in order; returns the exported .npz's path."""
    from bench.compose import load_config

    paper = ["scale=paper", *PREPARE_SIZES]
    runner.bench("weights", "scale=paper", "--no-verify")  # random stand-ins: present, not the published bytes
    missing = weights_present(["scale=paper"])
    if missing:
        raise RehearsalError(f"bench weights: {missing} missing although bench rehearse wrote them")
    runner.bench("prepare", *paper, *PREPARE_OPTIONS, *where)
    prepared = load_config(paper).data.prepared_dir
    runner.wait("the prepare jobs", lambda: prepare_done(prepared), timeout_s)
    runner.bench("status", "--prepare", *paper)
    runner.bench("grid", "table1", *where)
    runner.wait("the training jobs", lambda: grid_done("train"), timeout_s)
    runner.bench("grid", "table1", "--stage", "eval", *where)
    runner.wait("the evaluation jobs", lambda: grid_done("eval"), timeout_s)
    runner.bench("status", "table1")
    runner.bench("report", "table1")
    from bench.launch.grids import expand

    cell = next(c for c in expand("table1") if c.name == "redi-seed=0")
    out = Path(cell.run_dir) / "export-no_cfg.npz"
    runner.bench("export", str(cell.run_dir), "--step", str(STEPS), "--setting", "no_cfg", "--out", str(out))
    return str(out)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`bench rehearse [--cluster PROFILE | --local] [--workdir DIR] [--timeout-min M]`."""
    parser = argparse.ArgumentParser(
        prog="bench rehearse",
        description="The paper scale's path in miniature (generated images, random weights of the real "
                    "architectures), through the launcher, from a folder of its own: weights, prepare, "
                    "grid, eval, status, report, export. Run it on the cluster before spending GPU-days.")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--cluster", metavar="PROFILE", help="submit to this cluster profile (e.g. local-slurm)")
    where.add_argument("--local", action="store_true", help="subprocesses on this machine (profile local)")
    parser.add_argument("--workdir", type=Path, default=Path("redi-bench-rehearsal"),
                        help="the folder it writes and runs in (on a cluster: one the nodes share)")
    parser.add_argument("--timeout-min", type=float, default=60, help="give up on a stage after this long")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    record = rehearse(args.workdir, ["--cluster", args.cluster] if args.cluster else ["--local"],
                      args.timeout_min * 60)
    print(f"\nrehearse: every stage passed in {record['seconds']:.0f} s; commands and times in "
          f"{Path(record['workdir']) / 'rehearsal.json'}. The same commands, without the sizes, run the paper.")
    return 0
