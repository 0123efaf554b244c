"""The targets `bench perf` checks, and its printed report (a table, then a `targets` section).

Speed targets are ratios of *paired* repeats (perf_timing.paired_time_ratio), so load on a shared
machine cancels out; they are judged here, by the benchmark itself, never by timed unit tests.
"""

from __future__ import annotations

from typing import Optional

from bench.perf.profile import format_profile
from bench.perf.timing import Workload, paired_time_ratio

SPEEDUP_OVER_REFERENCE = 2.0  # default training path vs the official-style reference mode
MERGED_OVERHEAD = 1.03  # ReDi merged tokens vs latent-only, time per step
GUIDED_STEP = 2.1  # a guided sampling step (CFG or RG, one batched call) vs an unguided one

# The default step against the official fp32 step, side by side (--official), as the machine allows:
# on a CPU with AMX-BF16 the bf16 step >= 4x; elsewhere (and always in fp32) >= 90% of the ceiling,
# the official step over the arithmetic floor of the default's precision (bench/perf/roofline.py).
AMX_BF16_SPEEDUP = 4.0
SHARE_OF_CEILING = 0.9
# The default step spends at least this share of its time in its own arithmetic (floor / step).
FLOOR_SHARE = 0.75


def _target(name: str, status: str, measured: Optional[float], threshold: Optional[float] = None,
            comparison: str = "", detail: str = "") -> dict:
    return {"name": name, "status": status, "measured": measured, "threshold": threshold,
            "comparison": comparison, "detail": detail}


def _check(name: str, measured: float, threshold: float, comparison: str, detail: str = "") -> dict:
    ok = measured >= threshold if comparison == ">=" else measured <= threshold
    return _target(name, "PASS" if ok else "FAIL", measured, threshold, comparison, detail)


def _find(workloads: list[Workload], **fields) -> Optional[Workload]:
    for workload in workloads:
        if all(workload.fields.get(k) == v for k, v in fields.items()):
            return workload
    return None


def compute_targets(measured: dict[str, list[Workload]], checks: list[dict], batch: int,
                    attention: Optional[dict] = None, amx: bool = False) -> list[dict]:
    """Every target `bench perf` checks, PASS/FAIL with the measured value; INFO for reported-only
    ratios; SKIP (with the reason) when a needed workload was not run."""
    targets: list[dict] = [] if attention is None else [attention_target(attention)]
    if measured.get("train"):
        targets += train_targets(measured["train"], batch, amx)
    if measured.get("sample"):
        targets += sample_targets(measured["sample"])
    for check in checks:
        targets += loss_targets(check)
    return targets


def train_targets(train: list[Workload], batch: int, amx: bool) -> list[dict]:
    """The default step against the reference mode, ReDi's merged tokens against latent-only, the
    other specs (INFO), and the official step (--official) or else the ladder's rungs (INFO)."""
    targets = []
    reference = _find(train, spec="reference")
    ref_spec = reference.fields.get("reference_of") if reference else None
    default = _find(train, spec=ref_spec, mode="default") if ref_spec else None
    if reference and default:
        name = f"train: default >= {SPEEDUP_OVER_REFERENCE:.1f}x reference mode ({ref_spec}, batch {batch})"
        targets.append(_check(name, paired_time_ratio(reference, default), SPEEDUP_OVER_REFERENCE, ">=",
                              "speed-up = reference time per step / default time per step"))
        precomputed = _find(train, spec="reference_precomputed")
        if precomputed:
            targets.append(_target("train: default speed-up over the reference without its online encoder",
                                   "INFO", paired_time_ratio(precomputed, default),
                                   detail="fp32 + checkpointing only"))
    else:
        targets.append(_target(f"train: default >= {SPEEDUP_OVER_REFERENCE:.1f}x reference mode", "SKIP",
                               None, detail="needs --reference and --reference-spec among --specs"))
    latent = _find(train, spec="latent_only", mode="default")
    merged = _find(train, spec="redi", mode="default")
    if latent and merged:
        targets.append(_check(f"train: redi merged <= {MERGED_OVERHEAD:.2f}x latent_only time per step",
                              paired_time_ratio(merged, latent), MERGED_OVERHEAD, "<="))
    else:
        targets.append(_target(f"train: redi merged <= {MERGED_OVERHEAD:.2f}x latent_only", "SKIP", None,
                               detail="needs specs latent_only and redi"))
    for spec in ("redi_separate", "repa", "redi_repa"):
        other = _find(train, spec=spec, mode="default")
        if latent and other:
            targets.append(_target(f"train: {spec} / latent_only time per step", "INFO",
                                   paired_time_ratio(other, latent)))
    official = _find(train, spec="official")
    if official is not None:
        return targets + official_targets(train, official, batch, amx)
    precomputed = _find(train, spec="reference_precomputed")
    for rung in train:  # the ladder's rungs against the reference without its online encoder
        if precomputed and str(rung.fields.get("spec", "")).startswith("ladder"):
            targets.append(_target(f"train: {rung.fields['spec']} / reference without online encoder",
                                   "INFO", paired_time_ratio(precomputed, rung)))
    return targets


def sample_targets(sample: list[Workload]) -> list[dict]:
    """A guided sampling step (CFG, RG: one batched call) against an unguided one; CFG+RG is INFO."""
    targets = []
    spec = "redi" if _find(sample, spec="redi") else sample[0].fields.get("spec")
    unguided = _find(sample, spec=spec, guidance="none")
    for mode, limit in (("cfg", GUIDED_STEP), ("rg", GUIDED_STEP), ("cfg+rg", None)):
        guided = _find(sample, spec=spec, guidance=mode)
        if guided is None or unguided is None:
            if limit is not None:
                targets.append(_target(f"sample: {mode} step <= {limit:.1f}x unguided", "SKIP", None,
                                       detail=f"spec {spec} has no {mode} guidance"))
            continue
        ratio = paired_time_ratio(guided, unguided)
        if limit is None:
            targets.append(_target(f"sample: {mode} step / unguided ({spec}, 3 branches)", "INFO", ratio))
        else:
            targets.append(_check(f"sample: {mode} step <= {limit:.1f}x unguided ({spec}, one batched call)",
                                  ratio, limit, "<="))
    return targets


def loss_targets(check: dict) -> list[dict]:
    """One loss check's targets: the official network against redi-bench's, or the default
    precision, fp32 and the reference against float64."""
    if "official" in check:  # the official network vs redi-bench's, same weights and inputs
        return [_check(f"loss: official network vs redi-bench's (fp32, same weights and inputs), "
                       f"relative, {check['spec']}", check["rel_err"], check["rtol"], "<=")]
    rel, precision = check["rel_err"], check["precision"]
    loss = check["loss"]
    vs_fp32 = abs(loss["default"] - loss["fp32"]) / abs(loss["fp32"])
    return [_check(f"loss: default ({precision}) vs float64, relative, {check['spec']}",
                   rel["default"], check["default_rtol"], "<=", f"fp32 vs default: {vs_fp32:.2e}"),
            _check(f"loss: fp32 and reference (checkpointed) vs float64, relative, {check['spec']}",
                   max(rel["fp32"], rel["reference"]), check["fp32_rtol"], "<=")]


def attention_target(forms: dict) -> dict:
    """Does models.backbone.attention_form pick the fastest measured attention (bench/perf/roofline.py
    attention_forms)? fp32 keeps SDPA whatever is faster (bit-identical to the official code): INFO."""
    timings = ", ".join(f"{name} {ms:.2f} ms" for name, ms in forms["ms"].items())
    name = (f"attention: the rule's form ({forms['rule']}) vs the fastest measured ({forms['fastest']}), "
            f"{forms['dtype']} {'x'.join(map(str, forms['shape']))}, time ratio")
    detail = f"forward + backward of one block: {timings}"
    if forms["dtype"] == "float32":
        return _target(name, "INFO", forms["rule_over_fastest"], detail=detail + "; fp32 always runs SDPA")
    return _check(name, forms["rule_over_fastest"], forms["slack"], "<=", detail)


def official_targets(train: list[Workload], official: Workload, batch: int, amx: bool) -> list[dict]:
    """The default step against the official step of one run: speed-up (>= 4x in bf16 on AMX,
    >= 90% of the ceiling otherwise) and its arithmetic share, checked; the same two for the
    --ladder rung with the other train.compile, the ceilings and the ladder, as INFO."""
    ref_spec = official.fields.get("reference_of")
    fast = _find(train, spec=ref_spec, mode="default")
    floors = {w.fields["precision"]: w for w in train
              if w.fields.get("mode") == "floor" and w.fields.get("reference_of") == ref_spec}
    targets = []
    for precision, floor in floors.items():
        same = "the same arithmetic" if precision == "fp32" else "this arithmetic in bf16"
        targets.append(_target(f"train: ceiling = official step / the {precision} arithmetic floor", "INFO",
                               paired_time_ratio(official, floor),
                               detail=f"the most any step doing {same} with these kernels can gain"))
    where = f"side by side ({ref_spec}, batch {batch})"
    if fast is not None:
        targets += _step_targets(fast, "default", official, floors, amx, where, checked=True)
    rungs = [w for w in train if str(w.fields.get("spec", "")).startswith("ladder")]
    compiles = fast is not None and bool(fast.fields.get("compile"))
    other = next((w for w in rungs if w.fields.get("mode") == "default"), None)  # the default's other compile state
    if other is not None and fast is not None:
        label = "default without compile" if compiles else "default + compile"
        targets += _step_targets(other, label, official, floors, amx, where, checked=False)
    if rungs and fast is not None:  # the default row is rung 3 (eager) or rung 4 (compiled)
        rungs.insert(3 if compiles else 2, fast)
    fast_label = ("ladder 4: default step (+ torch.compile)" if compiles
                  else "ladder 3: default step (+ foreach EMA, NaN guard)")
    for rung in rungs:
        label = rung.fields["spec"] if rung is not fast else fast_label
        targets.append(_target(f"train: {label} / official step", "INFO",
                               paired_time_ratio(official, rung), detail="speed-up, paired repeats"))
    return targets


def _step_targets(step: Workload, label: str, official: Workload, floors: dict[str, Workload], amx: bool,
                  where: str, checked: bool) -> list[dict]:
    """`step`'s speed-up target (>= 4x in bf16 on AMX, else >= 90% of its precision's ceiling) and its
    floor share (>= 75%): PASS/FAIL for the default step, INFO for another row (the ladder's rung with
    the other train.compile, which shows what that setting would give)."""

    def measure(name: str, value: float, threshold: float, detail: str) -> dict:
        if checked:
            return _check(name, value, threshold, ">=", detail)
        return _target(name, "INFO", value, threshold, ">=", detail + "; not the default step")

    precision = step.fields.get("precision", "fp32")
    speedup = paired_time_ratio(official, step)
    floor = floors.get(precision)
    targets = []
    if precision == "bf16" and amx:
        targets.append(measure(f"train: {label} (bf16) >= {AMX_BF16_SPEEDUP:.1f}x the official fp32 step on AMX, "
                               f"{where}", speedup, AMX_BF16_SPEEDUP,
                               "official time per image / this step's time per image, paired repeats of this run"))
    elif floor is not None:
        ceiling = paired_time_ratio(official, floor)
        targets.append(measure(f"train: {label} ({precision}) speed-up over the official step >= "
                               f"{100 * SHARE_OF_CEILING:.0f}% of the {precision} ceiling, {where}",
                               speedup / ceiling, SHARE_OF_CEILING,
                               f"share; speed-up {speedup:.2f}x of a ceiling of {ceiling:.2f}x"))
    else:
        targets.append(_target(f"train: {label} ({precision}) vs the official step", "SKIP", speedup,
                               detail="needs the arithmetic floor (--roofline)"))
    if floor is not None:
        targets.append(measure(f"train: {label} ({precision}) time that is its arithmetic (floor / step) >= "
                               f"{100 * FLOOR_SHARE:.0f}%", paired_time_ratio(floor, step), FLOOR_SHARE,
                               "share, paired repeats; --profile says where the rest goes"))
    return targets


def _fmt(value: Optional[float]) -> str:
    if value is None:
        return "-"
    if value == 0 or 1e-2 <= abs(value) < 1e5:
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.1f}"
    return f"{value:.2e}"


def format_report(rows: list[dict], targets: list[dict], base: dict, precision: str, batch: int,
                  quick: bool = False) -> str:
    """The printed table (one line per row) and the targets section."""
    header = (f"bench perf  {base['run_id']}\n"
              f"model {base['model_size']} ({base['scale']} scale), batch {batch}, data {base['data']}, "
              f"default precision {precision}\n"
              f"device {base['device']} ({base['device_name']}"
              + (f"; CPU kernels {base['cpu_kernels']}" if base.get("cpu_kernels") and base["device"] == "cpu" else "")
              + f"), {base['threads']} threads, torch "
              f"{base['torch_version']}, commit {base['git_commit']}\n"
              f"load average (1/5/15 min) at start {base['load_avg_start']}, at end {base['load_avg_end']}\n"
              f"command: {base['command']}")
    columns = ("kind", "workload", "batch", "images/s", "IQR", "min", "max", "ms/call", "peak MB", "notes")
    table = []
    for r in rows:
        notes = row_notes(r)
        table.append((r["kind"], r["name"], str(r["batch"]), _fmt(r["images_per_s"]), _fmt(r["iqr"]),
                      _fmt(r["min"]), _fmt(r["max"]), f"{1000 * r['seconds_per_call']:.1f}",
                      _fmt(r["peak_memory_mb"]), notes))
    widths = [max(len(columns[i]), *(len(line[i]) for line in table)) if table else len(columns[i])
              for i in range(len(columns))]
    lines = [header, "", "  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip() for line in table]
    peaks = base.get("matmul_peak_gflops")
    if peaks:
        lines += ["", f"roofline: {peaks['size']}x{peaks['size']} matmul peak {peaks['fp32']:.1f} GFLOP/s fp32, "
                      f"{peaks['bf16']:.1f} GFLOP/s bf16 (native bf16: {base.get('native_bf16')}); training rows "
                      "count model FLOPs (matmuls, convolutions, attention; 3x forward; bench/perf/roofline.py)"]
    lines += format_profile(rows)
    lines += ["", "targets"]
    if quick:
        lines.append("  (--quick times a toy model in milliseconds per call for CI: its speed verdicts are noise; "
                     "judge the targets with e.g. --size custom:6,256,4,1 --batch 64 or --size S/2 --batch 16)")
    for t in targets:
        measured = "" if t["measured"] is None else f"measured {_fmt(t['measured'])}"
        if t["measured"] is not None and t["name"].startswith(("train", "sample", "attention")):
            measured += "x"
        detail = f"  ({t['detail']})" if t["detail"] else ""
        lines.append(f"  {t['status']:<4}  {t['name']}: {measured}{detail}".rstrip())
    return "\n".join(lines)


def _compiled(r: dict) -> str:
    if not r.get("compile"):
        return ""
    first = r.get("first_call_seconds")
    return ", compiled" + ("" if first is None else f" (first call, with the compile: {first:.0f} s)")


def row_notes(r: dict) -> str:
    """The notes column of one row of the printed table: what distinguishes rows of its kind."""
    if r["kind"] == "train" and r.get("mode") == "floor":
        roofline = "" if r.get("achieved_gflops") is None else f", {r['achieved_gflops']:.1f} GFLOP/s"
        return (f"every matmul ({r['floor_gemm_ms']:.0f} ms alone) and attention ({r['floor_attention_ms']:.0f} ms "
                f"alone) of one step, forward and backward, {r['dtype']}, nothing else{roofline}")
    if r["kind"] == "train":
        memory = ("" if r.get("state_memory_mb") is None else
                  f", state {r['state_memory_mb']:.0f} MB, saved activations {r['activation_memory_mb']:.0f} MB")
        roofline = ""
        if r.get("achieved_gflops") is not None:
            share = ("" if r.get("share_of_peak") is None
                     else f" = {100 * r['share_of_peak']:.1f}% of {r['precision']} peak")
            roofline = f", {r['achieved_gflops']:.1f} GFLOP/s{share}"
            if r.get("floor_share") is not None:
                roofline += f", arithmetic floor {100 * r['floor_share']:.0f}% of the step"
        return (f"{r['mode']}, {r['dtype']}, ckpt={'on' if r['activation_checkpointing'] else 'off'}, "
                f"{r['optimizer']}{_compiled(r)}, features {r['semantic_features']}, "
                f"{r['tokens']} tokens{memory}{roofline}")
    if r["kind"] == "table6":
        return (f"finished images: {r['sampling_steps']} {r['sampler']} steps + VAE decode ({r['vae']}), "
                f"{r['tokens']} tokens, {r['dtype']}")
    if r["kind"] == "sample":
        return f"{r['branches']} branch(es), {r['dtype']}, {r['tokens']} tokens"
    return f"{r['image_size']} px, {r['weights']}"  # prepare, eval
