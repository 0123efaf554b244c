"""Orchestration of `bench perf`: configs -> workloads -> timing -> rows, targets and the report."""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import os
import re
import sys
from pathlib import Path
from typing import Callable, Optional

import torch

from bench.atomic import atomic_write_json, atomic_write_text
from bench.config import ExperimentConfig
from bench.evaluate.sampling import SAMPLING_PRECISION
from bench.perf.infer import (
    TABLE6_SPECS,
    build_eval_workloads,
    build_prepare_workloads,
    build_sample_workloads,
    build_table6_workload,
)
from bench.perf.official import (
    build_official_workload,
    check_official_spec,
    load_official_code,
    official_loss_agreement,
)
from bench.perf.profile import profile_workload
from bench.perf.roofline import MATMUL_SIZE, attention_forms, matmul_peak
from bench.perf.setup import (
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
from bench.prepare.dataset import read_manifest
from bench.train.build import backbone_settings
from bench.train.data import check_prepared
from bench.train.step import native_bf16

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


def run_perf(args: argparse.Namespace, device: torch.device, command: str) -> dict:
    """Build, warm up and time every requested workload; write the results; return the report."""

    size: Optional[SizeChoice] = parse_size(args.size) if args.size else None
    scale = args.scale or ("paper" if size is not None and size.registry else "embedded")
    kinds = _csv(args.kinds, "--kinds", KINDS)
    specs = _csv(args.specs, "--specs")
    no_size = SizeChoice("", (), registry=False)
    # --reference, --ladder and --official all time --reference-spec, which --specs need not name
    uses_reference_spec = args.reference or args.ladder or bool(args.official)
    configs = {spec: compose_spec(spec, size or no_size, scale, args.overrides)
               for spec in dict.fromkeys(specs + ([args.reference_spec] if uses_reference_spec else []))}
    first = configs[specs[0]]
    # Unless --precision says otherwise, the precision bench train would use for this config.
    precision = resolve_precision(args.precision or first.train.precision, device)
    model_size = _size_label(first)
    batch = args.batch or first.train.batch_size
    rank = max([cfg.semantic_channels for cfg in configs.values()] + [1])
    needs_encoder = ("train" in kinds and args.reference) or "prepare" in kinds
    if args.data == "real":
        manifest = read_manifest(args.prepared_dir)
        for cfg in configs.values():  # the same refusals as `bench train` (encoder, data, ranks)
            check_prepared(cfg, manifest, args.prepared_dir)
        pool, geometry, _ = real_pool(args.prepared_dir, batch, rank, device, args.data_root,
                                      need_images=needs_encoder, seed=args.seed)
    else:
        geometry = synthetic_geometry(first)
        pool = synthetic_pool(geometry, batch, rank, device, seed=args.seed)
    env = environment(device, command)
    created = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    run_id = f"perf-{created}-{re.sub(r'[^A-Za-z0-9]+', '_', model_size).strip('_')}-b{batch}"
    _log(f"{run_id}: {model_size}, batch {batch}, {args.data} data, {scale} scale, {precision}, "
         f"device {device} ({env['device_name']}, {env['threads']} threads), load {env['load_avg_start']}")

    encoder_cache: dict[str, tuple] = {}

    def encoder():
        if "encoder" not in encoder_cache:
            encoder_cache["encoder"] = build_online_encoder(configs[specs[0]], geometry, device)
        return encoder_cache["encoder"]

    default = StepOptions(precision=precision, checkpointing=args.checkpointing, compile=args.compile)
    groups: dict[str, list[Callable[[], list[Workload]]]] = {kind: [] for kind in kinds}
    official_code = None
    if args.official and "train" in kinds:
        official_code = load_official_code(args.official)  # one clear error before anything is timed
        check_official_spec(configs[args.reference_spec])
        groups["train"].append(_labelled("official", lambda: [build_official_workload(
            official_code, configs[args.reference_spec], geometry, pool, device, args.seed)],
            reference_of=args.reference_spec))
    if "train" in kinds:
        for spec in specs:
            groups["train"].append(_labelled(spec, lambda s=spec: [build_train_workload(
                s, configs[s], geometry, pool, device, default, args.seed)]))
        if args.reference:
            ref = args.reference_spec
            precomputed = StepOptions(mode="reference-precomputed", precision="fp32", checkpointing=True,
                                      fused_optimizer=False, foreach_ema=False)
            groups["train"].append(_labelled("reference", lambda: [build_train_workload(
                "reference", configs[ref], geometry, pool, device, StepOptions.reference(), args.seed,
                encoder=encoder())], reference_of=ref))
            groups["train"].append(_labelled("reference_precomputed", lambda: [build_train_workload(
                "reference_precomputed", configs[ref], geometry, pool, device, precomputed, args.seed)],
                reference_of=ref))
        if args.ladder:  # one optimisation at a time, from the reference mode (fp32) to the default
            ref = args.reference_spec
            base = dict(mode="reference-precomputed", precision="fp32", foreach_ema=False)
            rungs = [("ladder 1: - checkpointing", StepOptions(**base, checkpointing=False, fused_optimizer=False)),
                     ("ladder 2: + fused AdamW", StepOptions(**base, checkpointing=False, fused_optimizer=True)),
                     # rung 3 is the default row itself (+ foreach EMA, NaN guard, its precision)
                     ("ladder 4: default step + torch.compile", dataclasses.replace(default, compile=True))]
            for label, options in rungs:
                groups["train"].append(_labelled(label, lambda label=label, options=options: [build_train_workload(
                    label, configs[ref], geometry, pool, device, options, args.seed)], reference_of=ref))
    if "train" in kinds and args.roofline:  # the arithmetic floor of every (network, precision) timed
        needed = {(spec, precision): None for spec in specs}
        if args.official or args.reference or args.ladder:
            needed[(args.reference_spec, "fp32")] = None
        for spec, floor_precision in needed:
            groups["train"].append(_labelled(f"floor {spec} {floor_precision}", lambda s=spec, fp=floor_precision: [
                build_floor_workload(f"arithmetic floor: {s} ({fp})", configs[s], geometry, batch, device, fp,
                                     args.quick)], reference_of=spec))
    if "sample" in kinds:
        sample_batch = args.sample_batch or batch
        # `bench sample` always runs fp32 (no autocast): time what it runs, not the training precision
        for spec in specs:
            groups["sample"].append(_labelled(spec, lambda s=spec: build_sample_workloads(
                s, configs[s], geometry, sample_batch, device, SAMPLING_PRECISION, args.seed)))
    encoder_batch = args.encoder_batch or batch
    if "prepare" in kinds:
        prepared_dir = args.prepared_dir if args.data == "real" else None
        groups["prepare"].append(lambda: build_prepare_workloads(
            configs[specs[0]], geometry, encoder_batch, device, encoder(), prepared_dir, args.seed))
    if "table6" in kinds:
        cells = [spec for spec in specs if spec in TABLE6_SPECS] or [specs[0]]
        for spec in cells:
            groups["table6"].append(_labelled(spec, lambda s=spec: [build_table6_workload(
                s, configs[s], geometry, args.table6_batch, args.table6_steps, device,
                args.prepared_dir if args.data == "real" else None, args.seed)]))
    if "eval" in kinds:
        prepared_dir = args.prepared_dir if args.data == "real" else None
        groups["eval"].append(lambda: build_eval_workloads(configs[specs[0]], geometry, encoder_batch,
                                                           device, prepared_dir, args.seed))

    measured: dict[str, list[Workload]] = {}
    for kind in kinds:
        measured[kind] = _measure(kind, groups[kind], args, device)

    checks = []
    if "train" in kinds:
        check_spec = args.reference_spec if args.reference_spec in configs else specs[0]
        _log(f"loss agreement of {check_spec}: float64 vs fp32 vs {precision} vs reference")
        checks.append(loss_agreement(configs[check_spec], geometry, pool, device, precision, args.seed))
        if official_code is not None:
            _log(f"loss agreement of {args.reference_spec}: the official network vs redi-bench's, "
                 "same weights and inputs")
            checks.append(official_loss_agreement(official_code, configs[args.reference_spec], geometry, device,
                                                  args.seed))
    peaks = {}
    if args.roofline and "train" in kinds:
        size = 256 if args.quick else MATMUL_SIZE
        _log(f"roofline: {size}x{size} matmul peak in fp32 and bf16")
        peaks = {"size": size, "fp32": matmul_peak(device, torch.float32, size),
                 "bf16": matmul_peak(device, torch.bfloat16, size)}
    attention = None
    if args.roofline and "train" in kinds:  # the measurement behind models.backbone.attention_form
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        _log(f"attention forms at the step's shape in {precision}: SDPA, SDPA on fp32 copies, math path")
        attention = attention_forms(backbone_settings(first, geometry.manifest()), batch, device, dtype)

    base = env | {"run_id": run_id, "created_at": utc_now(), "model_size": model_size, "scale": scale,
                  "data": pool.source, "warmup": args.warmup, "quick": bool(args.quick),
                  "load_avg_end": [round(v, 2) for v in os.getloadavg()]}
    base["matmul_peak_gflops"] = peaks or None
    base["native_bf16"] = native_bf16(device)
    base["attention_forms"] = attention  # every row carries the measurement behind the attention rule
    rows = _with_floor_shares([_roofline(_row(base, w), peaks) for kind in kinds for w in measured[kind]])
    amx = device.type == "cpu" and "amx_bf16" in env["cpu_flags"]  # the 4x bf16 target is an AMX CPU's
    targets = compute_targets(measured, checks, model_size, batch, attention, amx=amx)
    targets_doc = {"run_id": run_id, "command": command, "created_at": base["created_at"],
                   "device": env["device"], "device_name": env["device_name"], "cpu_kernels": env["cpu_kernels"],
                   "threads": env["threads"],
                   "load_avg_start": env["load_avg_start"], "load_avg_end": base["load_avg_end"],
                   "targets": targets, "loss_checks": checks}

    jsonl, targets_file = write_results(args.out, run_id, rows, targets_doc)
    failed = [t["name"] for t in targets if t["status"] == "FAIL"]
    report = format_report(rows, targets, base, precision, batch, quick=args.quick)
    return {"rows": rows, "targets": targets, "report": report, "jsonl": jsonl,
            "targets_file": targets_file, "checks": checks, "failed": failed}


def _labelled(label: str, factory: Callable[[], list[Workload]], **extra) -> Callable[[], list[Workload]]:
    """Wrap a factory so its workloads carry `spec` (and any extra fields) in their rows."""
    def build() -> list[Workload]:
        workloads = factory()
        for workload in workloads:
            workload.fields.setdefault("spec", label)
            workload.fields.update(extra)
        return workloads
    return build


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
            workload.fields["profile_ms"] = profile_workload(workload)
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
