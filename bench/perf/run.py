"""Orchestration of `bench perf`: configs -> workloads -> timing -> rows, targets and the report."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import json
import os
import re
import sys
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import torch

from bench.atomic import atomic_write_json, atomic_write_text
from bench.config import ExperimentConfig
from bench.evaluate.sampling import sampling_precision
from bench.perf.infer import (
    TABLE6_SPECS,
    build_eval_workloads,
    build_prepare_workloads,
    build_sample_workloads,
    build_table6_workload,
)
from bench.perf.official_step import (
    build_official_workload,
    check_official_spec,
    load_official_code,
    official_loss_agreement,
)
from bench.perf.profile import by_category, compiled_kernel_names, largest_outside_the_floor, profile_operators
from bench.perf.roofline import MATMUL_SIZE, attention_forms, matmul_peak
from bench.perf.setup import (
    BatchPool,
    Geometry,
    PerfError,
    SizeChoice,
    compose_spec,
    parse_size,
    real_pool,
    resolve_precision,
    synthetic_geometry,
    synthetic_pool,
)
from bench.perf.targets import compute_targets, format_report
from bench.perf.timing import PeakMemory, Workload, environment, summarize, time_round_robin, utc_now, warm_up
from bench.perf.training import (
    StepOptions,
    build_floor_workload,
    build_online_encoder,
    build_train_workload,
    loss_agreement,
)
from bench.precision import native_bf16
from bench.prepare.dataset import read_manifest
from bench.train.build import backbone_settings
from bench.train.data import check_prepared
from bench.train.step import resolve_compile

KINDS = ("train", "sample", "table6", "prepare", "eval")
DEFAULT_KINDS = ("train", "sample", "prepare", "eval")


def _csv(text: str, option: str, allowed=None) -> list[str]:
    items = list(dict.fromkeys(item.strip() for item in text.split(",") if item.strip()))
    if not items:
        raise PerfError(f"{option} is empty")
    bad = [item for item in items if allowed is not None and item not in allowed]
    if bad:
        raise PerfError(f"{option}: unknown {bad}; choose from {list(allowed)}")
    return items


def _size_label(cfg: ExperimentConfig) -> str:
    m = cfg.model
    return m.size if m.size != "custom" else f"custom:{m.depth},{m.hidden_size},{m.num_heads},{m.patch_size}"


def _log(message: str) -> None:
    print(f"perf: {message}", file=sys.stderr, flush=True)


@dataclass
class PerfPlan:
    """What every workload of one run shares: its options, configs, data pool and device."""

    args: argparse.Namespace
    device: torch.device
    kinds: list[str]
    specs: list[str]
    configs: dict[str, ExperimentConfig]
    scale: str
    precision: str
    """The default training path's, resolved for the device."""
    compile: bool
    """Whether the default training path runs under torch.compile, as bench train resolves it."""
    model_size: str
    batch: int
    geometry: Geometry
    pool: BatchPool
    _encoder: Optional[tuple] = field(default=None, repr=False)

    @property
    def first(self) -> ExperimentConfig:
        return self.configs[self.specs[0]]

    @property
    def prepared_dir(self) -> Optional[str]:
        return self.args.prepared_dir if self.args.data == "real" else None

    @property
    def encoder_batch(self) -> int:
        return self.args.encoder_batch or self.batch

    def encoder(self) -> tuple:
        """The online semantic encoder and its label, built on first use (reference mode, prepare)."""
        if self._encoder is None:
            self._encoder = build_online_encoder(self.first, self.geometry, self.device)
        return self._encoder


def run_perf(args: argparse.Namespace, device: torch.device, command: str) -> dict:
    """Build, warm up and time every requested workload; write the results; return the report."""
    plan = plan_run(args, device)
    env = environment(device, command)
    created = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    run_id = f"perf-{created}-{re.sub(r'[^A-Za-z0-9]+', '_', plan.model_size).strip('_')}-b{plan.batch}"
    _log(f"{run_id}: {plan.model_size}, batch {plan.batch}, {args.data} data, {plan.scale} scale, {plan.precision}, "
         f"device {device} ({env['device_name']}, {env['threads']} threads), load {env['load_avg_start']}")
    official_code = _official_code(plan)  # one clear error before anything is timed
    groups = {kind: kind_factories(kind, plan, official_code) for kind in plan.kinds}
    # --profile names a compiled step's kernels; the names are compiled in, so before the first call
    naming = compiled_kernel_names() if args.profile else contextlib.nullcontext()
    with naming:
        measured = {kind: _measure(kind, groups[kind], args, device) for kind in plan.kinds}
    checks = _loss_checks(plan, official_code)
    peaks, attention = _roofline_measurements(plan)
    base = _row_base(plan, env, run_id, peaks, attention)
    rows = _with_floor_shares([_roofline(_row(base, w), peaks) for kind in plan.kinds for w in measured[kind]])
    amx = device.type == "cpu" and "amx_bf16" in env["cpu_flags"]  # the 4x bf16 target is an AMX CPU's
    targets = compute_targets(measured, checks, plan.batch, attention, amx=amx)
    targets_doc = {"run_id": run_id, "command": command, "created_at": base["created_at"],
                   "device": env["device"], "device_name": env["device_name"], "cpu_kernels": env["cpu_kernels"],
                   "threads": env["threads"],
                   "load_avg_start": env["load_avg_start"], "load_avg_end": base["load_avg_end"],
                   "targets": targets, "loss_checks": checks}
    jsonl, targets_file = write_results(args.out, run_id, rows, targets_doc)
    failed = [t["name"] for t in targets if t["status"] == "FAIL"]
    report = format_report(rows, targets, base, plan.precision, plan.batch, quick=args.quick)
    return {"rows": rows, "targets": targets, "report": report, "jsonl": jsonl,
            "targets_file": targets_file, "checks": checks, "failed": failed}


def plan_run(args: argparse.Namespace, device: torch.device) -> PerfPlan:
    """The configs of every spec timed, the precision, the batch and the pool of batches."""
    size: Optional[SizeChoice] = parse_size(args.size) if args.size else None
    scale = args.scale or ("paper" if size is not None and size.registry else "embedded")
    kinds = _csv(args.kinds, "--kinds", KINDS)
    specs = _csv(args.specs, "--specs")
    # --reference, --ladder and --official all time --reference-spec, which --specs need not name
    uses_reference_spec = args.reference or args.ladder or bool(args.official)
    timed = dict.fromkeys(specs + ([args.reference_spec] if uses_reference_spec else []))
    configs = {spec: compose_spec(spec, size or SizeChoice("", (), registry=False), scale, args.overrides)
               for spec in timed}
    first = configs[specs[0]]
    # Unless --precision says otherwise, the precision bench train would use for this config.
    precision = resolve_precision(args.precision or first.train.precision, device)
    compiled = args.compile if args.compile is not None else resolve_compile(
        first.train.compile, device, first.train.max_steps)
    model_size = _size_label(first)
    batch = args.batch or first.train.batch_size
    geometry, pool = _batch_pool(args, configs, first, kinds, batch, device)
    return PerfPlan(args, device, kinds, specs, configs, scale, precision, compiled, model_size, batch, geometry,
                    pool)


def _batch_pool(args: argparse.Namespace, configs: dict[str, ExperimentConfig], first: ExperimentConfig,
                kinds: list[str], batch: int, device: torch.device) -> tuple[Geometry, BatchPool]:
    """Synthetic batches shaped like `first`'s data, or (--data real) batches of a prepared folder."""
    rank = max([cfg.semantic_channels for cfg in configs.values()] + [1])
    if args.data != "real":
        geometry = synthetic_geometry(first)
        return geometry, synthetic_pool(geometry, batch, rank, device, seed=args.seed)
    manifest = read_manifest(args.prepared_dir)
    for cfg in configs.values():  # the same refusals as `bench train` (encoder, data, ranks)
        check_prepared(cfg, manifest, args.prepared_dir)
    needs_encoder = ("train" in kinds and args.reference) or "prepare" in kinds
    pool, geometry, _ = real_pool(args.prepared_dir, batch, rank, device, args.data_root,
                                  need_images=needs_encoder, seed=args.seed)
    return geometry, pool


@dataclass(frozen=True)
class Labelled:
    """A workload factory whose workloads carry `spec` = label (and any extra fields) in their rows."""

    label: str
    build: Callable[[], list[Workload]]
    extra: dict = field(default_factory=dict)

    def __call__(self) -> list[Workload]:
        workloads = self.build()
        for workload in workloads:
            workload.fields.setdefault("spec", self.label)
            workload.fields.update(self.extra)
        return workloads


def _official_code(plan: PerfPlan):
    """The official checkout's code (--official), its spec checked; None when no train row needs it."""
    if not (plan.args.official and "train" in plan.kinds):
        return None
    code = load_official_code(plan.args.official)
    check_official_spec(plan.configs[plan.args.reference_spec])
    return code


def kind_factories(kind: str, plan: PerfPlan, official_code) -> list[Callable[[], list[Workload]]]:
    """The factories of one kind's workloads, in the order they are built (nothing is built here)."""
    args = plan.args
    if kind == "train":
        return _train_factories(plan, official_code)
    if kind == "sample":  # in eval.precision, as `bench sample` runs it
        return [Labelled(spec, partial(build_sample_workloads, spec, plan.configs[spec], plan.geometry,
                                       args.sample_batch or plan.batch, plan.device,
                                       sampling_precision(plan.configs[spec], plan.device), args.seed))
                for spec in plan.specs]
    if kind == "prepare":
        return [partial(_prepare_workloads, plan)]
    if kind == "table6":
        cells = [spec for spec in plan.specs if spec in TABLE6_SPECS] or [plan.specs[0]]
        return [Labelled(spec, partial(_table6_workload, plan, spec)) for spec in cells]
    # eval, the last of KINDS
    return [partial(build_eval_workloads, plan.first, plan.geometry, plan.encoder_batch, plan.device,
                    plan.prepared_dir, args.seed)]


def _train_factories(plan: PerfPlan, official_code) -> list[Labelled]:
    """The official step (--official), each spec's default step, the reference modes (--reference),
    the ladder's rungs (--ladder) and the arithmetic floors (--roofline), in that order."""
    args, ref = plan.args, plan.args.reference_spec
    default = StepOptions(precision=plan.precision, checkpointing=args.checkpointing, compile=plan.compile)
    factories = []
    if official_code is not None:
        factories.append(Labelled("official", partial(_official_workload, plan, official_code),
                                  {"reference_of": ref}))
    factories += [Labelled(spec, partial(_train_workload, plan, spec, spec, default)) for spec in plan.specs]
    if args.reference:
        precomputed = StepOptions(mode="reference-precomputed", precision="fp32", checkpointing=True,
                                  fused_optimizer=False, foreach_ema=False)
        factories += [
            Labelled("reference", partial(_train_workload, plan, "reference", ref, StepOptions.reference(),
                                          online_encoder=True), {"reference_of": ref}),
            Labelled("reference_precomputed", partial(_train_workload, plan, "reference_precomputed", ref,
                                                      precomputed), {"reference_of": ref})]
    if args.ladder:
        factories += [Labelled(label, partial(_train_workload, plan, label, ref, options), {"reference_of": ref})
                      for label, options in _ladder_rungs(default)]
    if args.roofline:  # the arithmetic floor of every (network, precision) timed
        needed = {(spec, plan.precision): None for spec in plan.specs}
        if args.official or args.reference or args.ladder:
            needed[(ref, "fp32")] = None
        factories += [Labelled(f"floor {spec} {precision}", partial(_floor_workload, plan, spec, precision),
                               {"reference_of": spec}) for spec, precision in needed]
    return factories


def _ladder_rungs(default: StepOptions) -> list[tuple[str, StepOptions]]:
    """One optimisation at a time, from the reference mode (fp32) to the default step. The default
    row itself is rung 3 when it runs eagerly (rung 4 adds torch.compile), rung 4 when it compiles
    (rung 3 is then the same step eager)."""
    base = dict(mode="reference-precomputed", precision="fp32", foreach_ema=False)
    rungs = [("ladder 1: - checkpointing", StepOptions(**base, checkpointing=False, fused_optimizer=False)),
             ("ladder 2: + fused AdamW", StepOptions(**base, checkpointing=False, fused_optimizer=True))]
    if default.compile:
        return rungs + [("ladder 3: default step without torch.compile", dataclasses.replace(default, compile=False))]
    return rungs + [("ladder 4: default step + torch.compile", dataclasses.replace(default, compile=True))]


def _train_workload(plan: PerfPlan, name: str, spec: str, options: StepOptions,
                    online_encoder: bool = False) -> list[Workload]:
    encoder = plan.encoder() if online_encoder else None
    return [build_train_workload(name, plan.configs[spec], plan.geometry, plan.pool, plan.device, options,
                                 plan.args.seed, encoder=encoder)]


def _official_workload(plan: PerfPlan, official_code) -> list[Workload]:
    return [build_official_workload(official_code, plan.configs[plan.args.reference_spec], plan.geometry,
                                    plan.pool, plan.device, plan.args.seed)]


def _floor_workload(plan: PerfPlan, spec: str, precision: str) -> list[Workload]:
    return [build_floor_workload(f"arithmetic floor: {spec} ({precision})", plan.configs[spec], plan.geometry,
                                 plan.batch, plan.device, precision, plan.args.quick)]


def _prepare_workloads(plan: PerfPlan) -> list[Workload]:
    return build_prepare_workloads(plan.first, plan.geometry, plan.encoder_batch, plan.device, plan.encoder(),
                                   plan.prepared_dir, plan.args.seed)


def _table6_workload(plan: PerfPlan, spec: str) -> list[Workload]:
    return [build_table6_workload(spec, plan.configs[spec], plan.geometry, plan.args.table6_batch,
                                  plan.args.table6_steps, plan.device, plan.prepared_dir, plan.args.seed)]


def _loss_checks(plan: PerfPlan, official_code) -> list[dict]:
    """The default precision's loss against float64 and, with --official, the official network's
    loss against redi-bench's (same weights and inputs)."""
    if "train" not in plan.kinds:
        return []
    args = plan.args
    check_spec = args.reference_spec if args.reference_spec in plan.configs else plan.specs[0]
    _log(f"loss agreement of {check_spec}: float64 vs fp32 vs {plan.precision} vs reference")
    checks = [loss_agreement(plan.configs[check_spec], plan.geometry, plan.pool, plan.device, plan.precision,
                             args.seed)]
    if official_code is not None:
        _log(f"loss agreement of {args.reference_spec}: the official network vs redi-bench's, "
             "same weights and inputs")
        checks.append(official_loss_agreement(official_code, plan.configs[args.reference_spec], plan.geometry,
                                              plan.device, args.seed))
    return checks


def _roofline_measurements(plan: PerfPlan) -> tuple[dict, Optional[dict]]:
    """The matmul peak in fp32 and bf16, and the attention forms at the step's shape (the measurement
    behind models.backbone.attention_form); nothing without --roofline or training rows."""
    if not (plan.args.roofline and "train" in plan.kinds):
        return {}, None
    size = 256 if plan.args.quick else MATMUL_SIZE
    _log(f"roofline: {size}x{size} matmul peak in fp32 and bf16")
    peaks = {"size": size, "fp32": matmul_peak(plan.device, torch.float32, size),
             "bf16": matmul_peak(plan.device, torch.bfloat16, size)}
    dtype = torch.bfloat16 if plan.precision == "bf16" else torch.float32
    _log(f"attention forms at the step's shape in {plan.precision}: SDPA, SDPA on fp32 copies, math path")
    attention = attention_forms(backbone_settings(plan.first, plan.geometry.manifest()), plan.batch, plan.device,
                                dtype)
    return peaks, attention


def _row_base(plan: PerfPlan, env: dict, run_id: str, peaks: dict, attention: Optional[dict]) -> dict:
    """The fields every row of the run carries: provenance, run settings and the roofline's measurements."""
    args = plan.args
    base = env | {"run_id": run_id, "created_at": utc_now(), "model_size": plan.model_size, "scale": plan.scale,
                  "data": plan.pool.source, "warmup": args.warmup, "quick": bool(args.quick),
                  "load_avg_end": [round(v, 2) for v in os.getloadavg()]}
    base["matmul_peak_gflops"] = peaks or None
    base["native_bf16"] = native_bf16(plan.device)
    base["attention_forms"] = attention  # every row carries the measurement behind the attention rule
    return base


def _measure(kind: str, factories: list, args: argparse.Namespace, device: torch.device) -> list[Workload]:
    """Build and warm up every workload of a kind, then time them (interleaved unless asked not to)."""
    done: list[Workload] = []
    pending: list[Workload] = []
    for factory in factories:
        with PeakMemory(device) as memory:
            workloads = factory()
            for workload in workloads:
                warm_up(workload, args.warmup, args.min_repeat_seconds)
        for workload in workloads:
            workload.peak_memory_mb = memory.value_mb
            workload.fields["memory_scope"] = memory.scope + (" (shared by the guidance modes of one network)"
                                                              if len(workloads) > 1 else "")
            _log(f"{kind}: built and warmed up {workload.name} ({workload.calls_per_repeat} calls/repeat)")
        if args.interleave:
            pending.extend(workloads)
        else:
            time_round_robin(workloads, args.repeats)
            for workload in workloads:
                workload.run = _released  # free the model before the next workload is built
            done.extend(workloads)
            del workloads
    if pending:
        time_round_robin(pending, args.repeats, progress=lambda m: _log(f"{kind}: {m}"))
        done.extend(pending)
    if kind == "train" and getattr(args, "profile", False):  # the workloads are still resident (parse_args)
        for workload in (w for w in done if w.fields.get("mode") != "floor"):  # the floor has no step to split
            _log(f"{kind}: profiling {workload.name}")
            operators, wall_ms = profile_operators(workload)
            workload.fields["profile_ms"] = by_category(operators, wall_ms)
            workload.fields["profile_largest"] = largest_outside_the_floor(operators, wall_ms)
    for workload in done:
        workload.run = _released  # the rows need only times and fields: free models before the next kind
    return done


def _roofline(row: dict, peaks: dict) -> dict:
    """Achieved model GFLOP/s of a training row and its share of the matmul peak of its precision."""
    flops = row.get("train_flops_per_image")
    if row["kind"] == "train" and flops:
        achieved = flops * row["images_per_s"] / 1e9
        peak = peaks.get("bf16" if row.get("precision") == "bf16" else "fp32") if peaks else None
        row = row | {"achieved_gflops": round(achieved, 2),
                     "share_of_peak": None if not peak else round(achieved / peak, 4)}
    return row


def floor_key(fields: dict) -> tuple[str, str]:
    """The arithmetic floor a training row is measured against: its network in its precision."""
    return str(fields.get("reference_of") or fields.get("spec")), str(fields.get("precision", "fp32"))


def _with_floor_shares(rows: list[dict]) -> list[dict]:
    """`floor_share` of each training row: its floor's median time per step over its own (same rounds)."""
    floors = {floor_key(r): r for r in rows if r["kind"] == "train" and r.get("mode") == "floor"}
    out = []
    for row in rows:
        floor = floors.get(floor_key(row)) if row["kind"] == "train" and row.get("mode") != "floor" else None
        out.append(row if floor is None else row | {
            "floor_share": round(floor["seconds_per_call"] / row["seconds_per_call"], 4)})
    return out


def _released() -> None:
    raise RuntimeError("this workload was released after timing")


def _row(base: dict, workload: Workload) -> dict:
    stats = summarize(workload.images_per_s())
    seconds_per_call = sorted(t / workload.calls_per_repeat for t in workload.times)
    return base | workload.fields | {
        "kind": workload.kind, "name": workload.name,
        "images_per_s": stats.median, "iqr": stats.iqr, "q25": stats.q25, "q75": stats.q75,
        "min": stats.min, "max": stats.max, "repeats": stats.repeats,
        "calls_per_repeat": workload.calls_per_repeat,
        "seconds_per_call": seconds_per_call[len(seconds_per_call) // 2],
        "times_s": [round(t, 6) for t in workload.times],
        "peak_memory_mb": None if workload.peak_memory_mb is None else round(workload.peak_memory_mb, 1),
    }


def write_results(out_dir: str, run_id: str, rows: list[dict], targets: dict) -> tuple[Path, Path]:
    """`<out>/<run>.jsonl` (one row per line) and `<out>/<run>.targets.json`, each atomically."""
    out = Path(out_dir)
    jsonl = atomic_write_text(out / f"{run_id}.jsonl",
                              "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows))
    return jsonl, atomic_write_json(out / f"{run_id}.targets.json", targets)
