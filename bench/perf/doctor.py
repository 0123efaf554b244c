"""`bench doctor [--cluster P] [key=value ...]`: a preflight on the user's own node, before GPU-days.

It checks, in minutes, what a CPU-only development machine cannot:

- loss/<spec>/<device>: the default training step's numerics (the config's precision: bf16 autocast
  or fp32/TF32, fused AdamW's model, SDPA attention, torch.compile when train.compile) give the
  loss of a float64 copy of the same network on the same batch and the same draws, within
  bench.perf.training's tolerances (1e-2 relative for bf16, 1e-5 for fp32; measured margins there).
  Runs on CPU always and on CUDA when present, for every spec.
- ddp/nccl: one training step on 2 GPUs (torchrun, NCCL) gives the gradients of the single-process
  step (bench.train's DDP is exact by construction; 1e-5 relative covers the reduction order: 2 gloo
  ranks on CPU measured 4.9e-7).
  Without 2 GPUs it is skipped and ddp/gloo runs the same check on 2 CPU processes (gloo): the
  harness's DDP code is checked, NCCL is not.
- weights/*: every weights file the config points to exists, loads, and has the published SHA-256
  where one is known (the 2015 Inception port); the others' SHA-256 is printed for the record.
- data/prepared: the prepared folder's manifest fits the config and every shard it lists exists.
- throughput/<spec>: `bench perf` training rows on this GPU, written to results/perf/ where
  `bench grid --dry-run` reads its GPU-hour estimate (bench.launch.plan.find_throughput).

One line per check (PASS, FAIL or SKIP and why); the exit status is 1 when any check failed. On a
machine without a GPU the CUDA checks are skipped and say so.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from bench.atomic import sha256_file
from bench.compose import dumps, from_dict, load_config, to_dict
from bench.config import ADM_IMAGENET256
from bench.launch.plan import find_throughput
from bench.launch.profiles import load_profile
from bench.perf.command import main as perf
from bench.perf.setup import compose_spec, parse_size, resolve_precision, synthetic_geometry, synthetic_pool
from bench.perf.training import loss_agreement
from bench.prepare.dataset import read_manifest
from bench.prepare.encoders import build_semantic_encoder, load_vae
from bench.report.comparability import INCEPTION_2015_SHA256_PREFIX as INCEPTION_SHA256_PREFIX
from bench.storage import (
    checkpoint_bytes,
    checkpoints_held,
    estimate_parameters,
    free_bytes,
    preflight_warning,
    sample_bytes,
)
from bench.train.checkpoint import checkpoint_path
from bench.train.data import check_prepared, read_align_manifest

SPECS = ("latent_only", "repa", "redi", "redi_rg", "redi_repa")
DDP_RTOL = 1e-5


def _adm_reference_sha256() -> Optional[str]:
    """The SHA-256 of ADM's VIRTUAL_imagenet256_labeled.npz (bench.config records it)."""
    return ADM_IMAGENET256.sha256


@dataclass
class Check:
    name: str
    status: str  # PASS, FAIL, SKIP, WARN (a finding that does not stop a run)
    detail: str

    def line(self) -> str:
        return f"{self.status:4s} {self.name}: {self.detail}"


class _Skip(Exception):
    """Raised by a check's body when there is nothing to check yet, which is no fault: a SKIP line."""


def _run(name: str, body: Callable[[], str]) -> Check:
    """PASS with body's detail; SKIP with a `_Skip`'s reason; FAIL with any other error (an
    AssertionError's message is the finding)."""
    try:
        return Check(name, "PASS", body())
    except _Skip as skip:
        return Check(name, "SKIP", str(skip))
    except Exception as err:  # a preflight reports every failure as a line, never a traceback
        return Check(name, "FAIL", f"{type(err).__name__}: {err}")


# ------------------------------------------------------------------------------------------------
# Numerics of the training step


def loss_checks(cfg_of: Callable[[str], object], specs: Sequence[str], device: torch.device,
                precision: str) -> list[Check]:
    """Per spec: the step's loss in `precision` on `device` against float64 (bench.perf.training)."""

    checks = []
    for spec in specs:
        def body(spec=spec) -> str:
            cfg = cfg_of(spec)
            geometry = synthetic_geometry(cfg)
            pool = synthetic_pool(geometry, 4, max(cfg.semantic_channels, 1), device, count=1)
            result = loss_agreement(cfg, geometry, pool, device, precision)
            rel = result["rel_err"]
            shape = "" if cfg.model.size != "custom" else f" {cfg.model.depth}x{cfg.model.hidden_size}"
            detail = (f"{precision} rel. error {rel['default']:.1e} (tol {result['default_rtol']:g}), "
                      f"fp32 {rel['fp32']:.1e} (tol {result['fp32_rtol']:g}) vs float64 "
                      f"({cfg.model.size}{shape}; "
                      "torch.compile is not exercised here: bench perf --compile times it)")
            if not result["ok"]:
                raise AssertionError(detail)
            return detail
        checks.append(_run(f"loss/{spec}/{device.type}", body))
    return checks


# ------------------------------------------------------------------------------------------------
# Files


def _sha256(path: Path) -> str:

    return sha256_file(path)


def _not_set(name: str, setting: str, why: str) -> Check:
    """A weights file the config does not name: nothing to check yet, which is no fault."""
    return Check(name, "SKIP", f"{setting} is not set ({why}; `bench weights` lists the files a scale needs)")


def vae_check(cfg) -> Check:
    """A diffusers AutoencoderKL: a local folder, or a repo id the Hugging Face cache holds. A repo id
    the cache lacks is a file not fetched yet (skipped); a local path that does not exist fails."""
    path = cfg.vae.path
    if cfg.vae.kind != "diffusers":
        return Check("weights/vae", "SKIP", "vae.kind=embedded: trained by bench prepare")
    if not path:
        return _not_set("weights/vae", "vae.path", "prepare and eval need SD-VAE")
    if not Path(path).is_dir() and not Path(path).exists() and not path.startswith((".", os.sep, "~")):
        return _run("weights/vae", lambda: _load_hub_vae(cfg))

    def body() -> str:
        if not Path(path).is_dir():
            raise FileNotFoundError(f"vae.path={path!r} is not a local diffusers folder")
        loaded = load_vae(cfg.vae)
        files = sorted(p for p in Path(path).glob("*.safetensors"))
        shas = ", ".join(f"{p.name} {_sha256(p)[:12]}" for p in files) or "no safetensors"
        return f"loads ({loaded.info.latent_channels} latent channels); {shas} (no published hash)"
    return _run("weights/vae", body)


def _load_hub_vae(cfg) -> str:
    """vae.path is a Hugging Face repo id: load it from the cache; one the cache lacks is skipped."""
    try:
        load_vae(cfg.vae)
    except ValueError as err:  # EncoderError: not in the Hugging Face cache
        raise _Skip(f"vae.path={cfg.vae.path!r} is a Hugging Face repo id not in the local cache (nothing is "
                    "downloaded); `bench weights` prints the command that fetches it") from err
    return f"vae.path={cfg.vae.path!r} loads from the Hugging Face cache"


def encoder_check(cfg) -> Check:
    if cfg.encoder.kind != "dinov2":
        return Check("weights/encoder", "SKIP", f"encoder.kind={cfg.encoder.kind}: packaged")
    path = cfg.encoder.weights
    if not path:
        return _not_set("weights/encoder", "encoder.weights", "prepare needs DINOv2's weights file")

    def body() -> str:
        if not Path(path).is_file():
            raise FileNotFoundError(f"encoder.weights={path!r} does not exist")
        built = build_semantic_encoder(cfg.encoder, cfg.data.image_size)
        return f"{built.info.encoder_id} loads; sha256 {_sha256(Path(path))[:12]} (no published hash)"
    return _run("weights/encoder", body)


def inception_check(cfg) -> Check:
    if cfg.eval.feature_network != "inception":
        return Check("weights/inception", "SKIP", f"eval.feature_network={cfg.eval.feature_network}")
    path = cfg.eval.inception_weights
    if not path:
        return _not_set("weights/inception", "eval.inception_weights", "eval needs the 2015 Inception port")

    def body() -> str:
        if not Path(path).is_file():
            raise FileNotFoundError(f"eval.inception_weights={path!r} does not exist")
        sha = _sha256(Path(path))
        if not sha.startswith(INCEPTION_SHA256_PREFIX):
            raise AssertionError(f"sha256 {sha[:12]} is not the 2015 Inception port's "
                                 f"({INCEPTION_SHA256_PREFIX}...)")
        state = torch.load(path, map_location="cpu", weights_only=True)
        return f"loads ({len(state)} tensors); sha256 {sha[:12]} is the 2015 graph's port"
    return _run("weights/inception", body)


def reference_check(cfg) -> Check:
    if not cfg.eval.reference:
        if cfg.data.name == "imagefolder":
            return _not_set("weights/reference", "eval.reference",
                            "the paper's numbers need ADM's VIRTUAL_imagenet256_labeled.npz")
        return Check("weights/reference", "SKIP", "eval.reference is not set (the prepared test split "
                     "is the reference)")

    def body() -> str:
        import numpy as np

        path = Path(cfg.eval.reference)
        if not path.is_file():
            raise FileNotFoundError(f"eval.reference={str(path)!r} does not exist")
        with np.load(path, allow_pickle=False) as npz:
            keys = sorted(npz.files)
        sha, adm = _sha256(path), _adm_reference_sha256()
        if adm is None:
            return f"{path.name}: arrays {keys}; sha256 {sha[:12]} (no published hash known here)"
        if sha != adm:
            raise AssertionError(f"sha256 {sha[:12]} is not ADM's VIRTUAL_imagenet256_labeled.npz "
                                 f"({adm[:12]}): the report will not compare its rows")
        return f"{path.name}: arrays {keys}; sha256 {sha[:12]} is ADM's reference batch"
    return _run("weights/reference", body)


def weights_checks(cfg) -> list[Check]:
    """The VAE, the semantic encoder, Inception and the reference batch the config points to: a
    file the config does not name is skipped with the reason, a named one that is missing, does not
    load or has another published hash fails."""
    return [vae_check(cfg), encoder_check(cfg), inception_check(cfg), reference_check(cfg)]


def disk_check(cfg) -> Check:
    """output_root's disk has room for one run of the config: the checkpoints it holds at once and
    one evaluation's samples per kept milestone (bench.storage's estimate). Short is a warning."""
    parameters = estimate_parameters(cfg.model, cfg.num_model_classes)
    held = checkpoints_held(cfg.train)
    needed = checkpoint_bytes(parameters) * held + sample_bytes(cfg) * max(len(cfg.train.milestones), 1)
    planned = f"{held} checkpoint(s) of ~{checkpoint_bytes(parameters) / 2**20:.0f} MB and samples"
    warning = preflight_warning(cfg.output_root, needed, f"one run ({planned})")
    if warning:
        return Check("storage/output_root", "WARN", warning.removeprefix("warning: "))
    free = free_bytes(cfg.output_root)
    room = f"{free / 2**30:.1f} GB free" if free is not None else "free space unknown"
    return Check("storage/output_root", "PASS", f"{cfg.output_root}: {room}, one run writes ~"
                                                f"{needed / 2**30:.2f} GB ({planned})")


def data_check(cfg) -> Check:
    """The prepared folder fits the config and holds every shard its manifest lists (skipped when
    the folder does not exist yet: a node may be checked before `bench prepare` runs)."""
    if not Path(cfg.data.prepared_dir).exists():
        return Check("data/prepared", "SKIP", f"data.prepared_dir={cfg.data.prepared_dir} does not exist "
                     "yet: `bench prepare` writes it")

    def body() -> str:
        folder = Path(cfg.data.prepared_dir)
        manifest = read_manifest(folder)
        check_prepared(cfg, manifest, str(folder), read_align_manifest(cfg))
        shards = [s for split in manifest["splits"].values() for s in split["shards"]]
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} of {len(shards)} shards missing, e.g. {missing[0]}")
        counts = ", ".join(f"{k} {v['count']}" for k, v in manifest["splits"].items())
        return f"{folder}: {len(shards)} shards ({counts}), encoder {manifest['encoder']['encoder_id']}"
    return _run("data/prepared", body)


# ------------------------------------------------------------------------------------------------
# GPUs: DDP and throughput


def first_step_gradients(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    """Every parameter's gradient of step 1, scaled by 1 - beta1: AdamW's exp_avg after its first
    step (the checkpoint's optimizer state). Compared instead of the weights: Adam's first update,
    lr * g / (|g| + eps), turns a float32 rounding difference of a gradient element near zero into
    a difference of order lr (measured on 2 gloo ranks: 5.9e-5 of the largest weight, from
    rounding alone), and it is blind to a gradient's scale (a missing loss factor W)."""
    from safetensors.torch import load_file

    tensors = load_file(str(Path(ckpt_dir) / "state.safetensors"))
    return {key: value.double() for key, value in tensors.items() if key.endswith(".exp_avg")}


def check_model_config(overrides: Sequence[str]):
    """The config of `overrides` for the doctor's small check model: a REPA alignment block deeper
    than the check model (the paper's align_layer 8 on a depth-2 model) moves to its last block,
    where the projector, its loss and their gradients run as at full size."""
    cfg = load_config(overrides)
    depth = cfg.model.depth if cfg.model.size == "custom" else 0
    if depth and cfg.objective.align_layer > depth:
        cfg = load_config([*overrides, f"objective.align_layer={depth}"])
    return cfg


# Settings that name files or folders; vae.path may also be a Hugging Face repo id.
PATH_SETTINGS = (("data", "root"), ("data", "prepared_dir"), ("data", "align_prepared_dir"), ("vae", "path"),
                 ("encoder", "weights"), ("eval", "inception_weights"), ("eval", "dinov2_weights"),
                 ("eval", "reference"))


def with_absolute_paths(cfg):
    """`cfg` with every relative path setting made absolute against the current folder, so that a
    child process started in another folder reads the same files. A vae.path that is no local
    folder stays as written: it is a repo id of the Hugging Face cache."""
    data = to_dict(cfg)
    for section, key in PATH_SETTINGS:
        value = data[section].get(key)
        if not value or Path(value).is_absolute():
            continue
        if section == "vae" and not Path(value).expanduser().exists():
            continue
        data[section][key] = str(Path(value).expanduser().resolve())
    data["output_root"] = str(Path(data["output_root"]).expanduser().resolve())
    return from_dict(data)


def _absolute_python_path(python_path: str) -> str:
    """PYTHONPATH for a child started in another folder: the entries given, made absolute, after the
    checkout this `bench` package comes from (the child checks the same harness; an installed
    package is found without help, and its site-packages must not shadow the standard library)."""
    harness = Path(__file__).resolve().parents[2]
    entries = [str(Path(p).resolve()) for p in python_path.split(os.pathsep) if p]
    if harness.name not in ("site-packages", "dist-packages"):
        entries.insert(0, str(harness))
    return os.pathsep.join(dict.fromkeys(entries))


def _child_error(stderr: str) -> str:
    """The line of a failed torchrun child that says why: the harness's one-line error or the last
    exception, not torchrun's summary that follows it."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    ours = [ln for ln in lines if ln.startswith("bench ")]
    errors = [ln for ln in lines if ("Error" in ln or "error:" in ln) and "ChildFailedError" not in ln
              and "elastic" not in ln]
    return ((ours or errors or lines or ["no output"])[-1])[-300:]


def ddp_check(overrides: Sequence[str], backend: str = "nccl", two_rank_overrides: Sequence[str] = ()) -> Check:
    """One training step on 2 ranks (torchrun) against the single-process step: the same gradient of
    every parameter within DDP_RTOL of its largest element (`first_step_gradients`). backend nccl:
    2 GPUs; gloo: 2 CPU processes (CUDA hidden), the same check where no GPUs are, which exercises
    the harness's DDP code (its row split, gathers and loss scaling) but not NCCL.
    `two_rank_overrides` are added to the 2-rank run only: tests pass a perturbation there to prove
    the check fails when the two paths differ. Each child gets the whole config as a file, every
    path in it absolute (it runs in a temporary folder); without a prepared folder it is skipped.
    Always in fp32: the check is of the row split, gathers and reduction (of fp32 gradients in any
    precision), and bf16 matmuls round differently on half the rows, far above DDP_RTOL."""
    name = f"ddp/{backend}"
    if backend == "nccl" and (not torch.cuda.is_available() or torch.cuda.device_count() < 2):
        return Check(name, "SKIP", f"needs 2 GPUs, found {torch.cuda.device_count()}"
                     " (ddp/gloo runs the same check on 2 CPU processes)")
    try:
        configs = {world: with_absolute_paths(check_model_config(
            [*overrides, *(two_rank_overrides if world == 2 else ()), "train.max_steps=1", "train.ckpt_every=1",
             "train.precision=fp32"]))
            for world in (1, 2)}
    except ValueError as err:  # ConfigError: the config itself is wrong
        return Check(name, "FAIL", f"{type(err).__name__}: {err}")
    if not Path(configs[1].data.prepared_dir).exists():
        return Check(name, "SKIP", f"data.prepared_dir={configs[1].data.prepared_dir} does not exist yet "
                     "(the check trains one step on it): run `bench prepare` first")
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "SUBMITIT_EXECUTOR"):  # a doctor started inside a job must not join that job's group
        env.pop(key, None)
    if backend == "gloo":
        env["CUDA_VISIBLE_DEVICES"] = ""  # bench.train.distributed picks gloo when no GPU is visible
    env["PYTHONPATH"] = _absolute_python_path(env.get("PYTHONPATH", ""))

    def body() -> str:
        with tempfile.TemporaryDirectory() as tmp:
            runs = {}
            for world, cfg in configs.items():
                out, config_file = Path(tmp) / f"w{world}", Path(tmp) / f"config-w{world}.json"
                config_file.write_text(dumps(cfg) + "\n", encoding="utf-8")
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                       f"--nproc_per_node={world}", "-m", "bench.cli", "train", "--config", str(config_file),
                       "--run-dir", str(out)]
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=tmp)
                if done.returncode:
                    raise RuntimeError(f"{world}-rank step failed: {_child_error(done.stderr)}")
                runs[world] = first_step_gradients(checkpoint_path(out, 1))
            worst, name_of = max((float((runs[2][k] - v).abs().max() / v.abs().max().clamp_min(1e-30)), k)
                                 for k, v in runs[1].items())
            if worst > DDP_RTOL:
                raise AssertionError(f"2-rank gradients differ from 1-rank by {worst:.1e} relative "
                                     f"(tol {DDP_RTOL:g}; worst: {name_of})")
            where = "NCCL" if backend == "nccl" else "gloo, 2 CPU processes; NCCL itself is not exercised"
            return f"2 ranks ({where}) = 1 rank: first step's gradients, max rel. difference {worst:.1e}"
    return _run(name, body)


def throughput_checks(specs: Sequence[str], size: str, batch: int, scale: str, perf_dir: str,
                      precision: str = "fp32", compile_: Optional[bool] = False,
                      device: Optional[str] = None, extra: Sequence[str] = ()) -> list[Check]:
    """`bench perf --kinds train` on this GPU (`device` cuda; cpu in tests); its rows land where
    `bench grid --dry-run` reads them, which the check confirms by reading them back the same way."""
    device = device or ("cuda" if torch.cuda.is_available() else None)
    if device is None:
        return [Check(f"throughput/{s}", "SKIP", "no GPU: the GPU-hour estimate needs a GPU row")
                for s in specs]

    def body() -> str:
        code = perf(["--size", size, "--batch", str(batch), "--device", device, "--kinds", "train",
                     "--specs", ",".join(specs), "--scale", scale, "--no-reference",
                     "--precision", precision, *{True: ["--compile"], False: ["--no-compile"]}.get(compile_, []),
                     *extra, "--out", perf_dir])
        if code:
            raise RuntimeError(f"bench perf exited {code}")
        found = []
        for spec in specs:
            cfg = compose_spec(spec, parse_size(size), scale, [])
            value, source = find_throughput(cfg, device, _NO_GRID,
                                            None, perf_dir)
            if value is None or not source.startswith("measured"):
                raise AssertionError(f"bench grid --dry-run does not find the {spec} row in {perf_dir}")
            found.append(f"{spec} {value:.3g}")
        return f"images/s per {device}: {', '.join(found)} (in {perf_dir}/, read by bench grid --dry-run)"
    return [_run("throughput/train", body)]


class _NoGrid:
    """find_throughput's fallbacks (a grid's or profile's number) are not what this check measures."""

    throughput: dict = {}


_NO_GRID = _NoGrid()


# ------------------------------------------------------------------------------------------------
# The command


def build_parser() -> argparse.ArgumentParser:
    """The options of `bench doctor` (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="bench doctor", description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="the config to check (as for bench train), e.g. scale=paper vae.path=...")
    parser.add_argument("--cluster", help="a cluster profile (slurm/profiles/P.yaml): its name is "
                        "recorded; run this on one of its nodes")
    parser.add_argument("--specs", default=",".join(SPECS), help="default: %(default)s")
    parser.add_argument("--size", default=None, help="model size of the numerics check (default: "
                        "the config's on CUDA, custom:2,64,2,2 on CPU, where fp64 XL is too slow)")
    parser.add_argument("--batch", type=int, default=32, help="throughput batch per GPU")
    parser.add_argument("--perf-dir", default="results/perf")
    parser.add_argument("--skip", default="", help="comma-separated groups to skip: loss, ddp, "
                        "weights, data, throughput")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_intermixed_args(list(sys.argv[1:] if argv is None else argv))
    if args.cluster:
        load_profile(args.cluster)  # a wrong name is one clear error
    cfg = load_config(args.overrides)
    cuda = torch.cuda.is_available()
    print(f"bench doctor: torch {torch.__version__}, CUDA {'yes: ' + torch.cuda.get_device_name(0) if cuda else 'no'}"
          f", cluster profile {args.cluster or 'none'}, train.precision={cfg.train.precision}", flush=True)
    checks = run_checks(args, cfg)
    for check in checks:
        print(check.line(), flush=True)
    failed = [c for c in checks if c.status == "FAIL"]
    skipped = [c for c in checks if c.status == "SKIP"]
    print(f"bench doctor: {len(checks) - len(failed) - len(skipped)} passed, {len(failed)} failed, "
          f"{len(skipped)} skipped")
    return 1 if failed else 0


def run_checks(args: argparse.Namespace, cfg) -> list[Check]:
    """Every group of checks --skip does not name, in the order they are printed."""
    specs = [s for s in args.specs.split(",") if s]
    skip = {s for s in args.skip.split(",") if s}
    scale = next((o.split("=", 1)[1] for o in args.overrides if o.startswith("scale=")), "embedded")
    checks: list[Check] = []
    if "loss" not in skip:
        checks += _loss_groups(args, cfg, specs)
    if "ddp" not in skip:
        checks += _ddp_checks(args.overrides)
    if "weights" not in skip:
        checks += weights_checks(cfg)
    if "data" not in skip:
        checks.append(data_check(cfg))
        checks.append(disk_check(cfg))
    if "throughput" not in skip:
        checks += throughput_checks(specs, args.size or cfg.model.size, args.batch, scale,
                                    args.perf_dir, cfg.train.precision, cfg.train.compile)
    return checks


# Overrides that set the spec or the model's shape: the check model sets its own.
_MODEL_SETTINGS = ("spec=", "model.size", "model.depth", "model.hidden_size", "model.num_heads", "model.patch_size")


def spec_configs(overrides: Sequence[str], size: str) -> Callable[[str], object]:
    """spec -> the config of the check model of that spec at `size`, with the user's other overrides."""
    choice = parse_size(size)
    user = [o for o in overrides if not o.startswith(_MODEL_SETTINGS)]
    return lambda spec: check_model_config([*user, f"spec={spec}", *choice.overrides])


def _loss_groups(args: argparse.Namespace, cfg, specs: Sequence[str]) -> list[Check]:
    """The loss checks on the CPU (at --size or a tiny model) and, when there is one, on the GPU."""
    cpu = torch.device("cpu")
    checks = loss_checks(spec_configs(args.overrides, args.size or "custom:2,64,2,2"), specs, cpu,
                         resolve_precision(cfg.train.precision, cpu))
    if not torch.cuda.is_available():
        return checks + [Check("loss/*/cuda", "SKIP", "no GPU: the GPU path was not checked")]
    cuda = torch.device("cuda")
    return checks + loss_checks(spec_configs(args.overrides, args.size or cfg.model.size), specs, cuda,
                                resolve_precision(cfg.train.precision, cuda))


def _ddp_checks(overrides: Sequence[str]) -> list[Check]:
    """ddp/nccl on 2 GPUs; without them, the harness's DDP path on 2 CPU processes (ddp/gloo)."""
    tiny = [*overrides, "model.size=custom", "model.depth=2", "model.hidden_size=64",
            "model.num_heads=2", "model.patch_size=2", "train.batch_size=8"]
    checks = [ddp_check(tiny)]
    if checks[0].status == "SKIP":
        checks.append(ddp_check(tiny, backend="gloo"))
    return checks
