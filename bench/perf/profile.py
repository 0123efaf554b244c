"""Where a training step's time goes: `bench perf --profile` runs each training workload under
torch.profiler after it was timed and sums the operators' *self* CPU time per category.

Categories, by operator name, or by the region an operator runs inside (the optimiser's own
`Optimizer.step` / `Optimizer.zero_grad` regions, and the `ema` region the EMA updates open):

| category | operators |
|---|---|
| matmul | mm, addmm, bmm, baddbmm, convolutions (every linear layer, forward and backward) |
| attention | SDPA's kernels, forward and backward; the math path's softmax (its two products are matmuls) |
| layernorm | layer_norm forward and backward |
| activation | GELU, SiLU, tanh, forward and backward |
| elementwise | every other arithmetic operator: modulation, gates, residual adds, the loss, gradient clipping |
| copies | copy_, cat, clone, contiguous, _to_copy, fills, allocation (data movement, no arithmetic) |
| optimizer | everything inside the optimiser's step and zero_grad |
| ema | everything inside the EMA update |
| autograd | the autograd engine's own per-node time (`autograd::...` events) |
| unattributed | the step's wall time minus all of the above: Python, dispatch, the profiler itself |

A compiled step's fused kernels (torch.compile on a CPU) are named by `compiled_kernel_names()`,
which `bench perf --profile` turns on before it builds the workloads: each C++ kernel inductor
generates then records `graph_<n>_cpp_fused_<its operators>_<k>`, and lands in the first category
its operators name, in this order: attention (a softmax), layernorm, activation (sigmoid, the
compiled GELU's form, or tanh, SiLU, GELU), copies (only layout and dtype operators: clone, permute,
view, cat, _to_copy, ...), elementwise (anything else). A kernel that fuses an activation's backward
into a layer norm's counts as layernorm; the categories of a compiled step are therefore where its
kernels' time goes, named by the most distinctive operator each fuses. The compiled graph's own
wrapper (`## Call CompiledFxGraph ...`) is Python: unattributed.

Beside the categories, each profiled row records (`profile_largest`) and prints the three largest
operators or kernels of every category the arithmetic floor does not count (all but matmul,
attention and unattributed), those of at least half a percent of the step: the names to look at
when the floor share is short of the step.

The profiler adds a few microseconds per operator, so the shares of small operators are
overstated; the timed rows (images/s) never run under it.
"""

from __future__ import annotations

import re
import time
from collections import defaultdict

from torch.profiler import ProfilerActivity, profile

from bench.perf.timing import Workload

CATEGORIES = ("matmul", "attention", "layernorm", "activation", "elementwise", "copies", "optimizer", "ema",
              "autograd", "unattributed")
EMA_REGION = "ema"
FLOOR_CATEGORIES = ("matmul", "attention")  # what bench/perf/roofline.py's arithmetic floor counts
MIN_LISTED_SHARE = 0.005  # largest_outside_the_floor leaves out operators under 0.5% of the step
_MATMUL = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear",
           "aten::convolution", "aten::_convolution", "aten::mkldnn_convolution", "aten::convolution_backward",
           "aten::_mkldnn_convolution", "aten::addmm_", "aten::mkldnn_linear")
_COPIES = ("aten::copy_", "aten::cat", "aten::clone", "aten::contiguous", "aten::_to_copy", "aten::to",
           "aten::fill_", "aten::zero_", "aten::zeros", "aten::zeros_like", "aten::empty", "aten::empty_like",
           "aten::empty_strided", "aten::ones_like", "aten::full", "aten::stack", "aten::index_select",
           "aten::embedding", "aten::embedding_dense_backward", "aten::new_zeros", "aten::new_empty_strided",
           "aten::resize_", "aten::_unsafe_view", "aten::reshape", "aten::view", "aten::permute",
           "aten::transpose", "aten::t", "aten::expand", "aten::as_strided", "aten::unsqueeze", "aten::squeeze",
           "aten::slice", "aten::select", "aten::split", "aten::chunk", "aten::unbind", "aten::narrow",
           "aten::flatten", "aten::detach", "aten::alias", "aten::lift_fresh", "aten::_reshape_alias")


# Operators inductor names in a fused kernel that move or cast data without arithmetic
_LAYOUT_OPS = ("_unsafe_view", "_to_copy", "as_strided", "unsqueeze", "transpose", "contiguous", "permute",
               "squeeze", "select", "unbind", "expand", "stack", "split", "slice", "clone", "view", "cat")
_INDUCTOR_KERNEL = re.compile(r"^graph_\d+_cpp_fused_(?P<ops>.+?)(_\d+)?$")


def compiled_kernel_names():
    """A context in which torch.compile's C++ kernels for a CPU record their names in a torch
    profile (they are otherwise one opaque call per compiled graph). The names cost one profiler
    record per kernel launch, microseconds in a step of hundreds of milliseconds."""
    import torch._inductor.config as inductor_config  # imported on use: heavy, and only --profile needs it

    return inductor_config.patch({"cpp.enable_kernel_profile": True})


def _compiled_kernel_category(ops: str) -> str:
    """The category of an inductor kernel from the operators its name lists (module docstring)."""
    if "softmax" in ops:
        return "attention"
    if "layer_norm" in ops:
        return "layernorm"
    if any(a in ops for a in ("sigmoid", "gelu", "tanh", "silu")):
        return "activation"
    rest = ops
    for op in _LAYOUT_OPS:
        rest = rest.replace(op, "")
    return "copies" if not rest.strip("_") else "elementwise"


def categorize(name: str, regions: tuple[str, ...]) -> str:
    """The category of one operator event, given the names of the regions it runs inside."""
    if any(r.startswith(("Optimizer.step", "Optimizer.zero_grad")) for r in regions):
        return "optimizer"
    if EMA_REGION in regions:
        return "ema"
    if name.startswith("autograd::") or name.startswith("torch::autograd::"):
        return "autograd"
    kernel = _INDUCTOR_KERNEL.match(name)
    if kernel:
        return _compiled_kernel_category(kernel["ops"])
    if name.startswith("## Call CompiledFxGraph"):
        return "unattributed"  # the compiled graph's Python wrapper; its kernels are named apart
    lowered = name.lower()
    if any(key in lowered for key in ("scaled_dot_product", "flash_attention", "efficient_attention", "softmax")):
        return "attention"
    if name in _MATMUL:
        return "matmul"
    if "layer_norm" in lowered:
        return "layernorm"
    if any(a in lowered for a in ("gelu", "silu", "tanh")):
        return "activation"
    if name in _COPIES:
        return "copies"
    if name.startswith("aten::") or name.startswith("inductor") or "triton" in lowered or "graph" in lowered:
        return "elementwise"
    return "unattributed"


def profile_operators(workload: Workload, steps: int = 2) -> tuple[dict[tuple[str, str], float], float]:
    """Milliseconds per call of `workload` of each (category, operator or kernel name), from `steps`
    profiled calls, and the profiled call's wall time in ms. CPU only: on a GPU, self CPU time is
    launch time, not the kernels' (bench perf refuses --profile there)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            workload.run()
        wall = time.perf_counter() - start
    operators: dict[tuple[str, str], float] = defaultdict(float)
    for event in prof.events():
        regions, parent = [event.name], event.cpu_parent  # a region's own Python time counts in it too
        while parent is not None:
            regions.append(parent.name)
            parent = parent.cpu_parent
        operators[(categorize(event.name, tuple(regions)), event.name)] += event.self_cpu_time_total / 1000.0 / steps
    return dict(operators), 1000.0 * wall / steps


def by_category(operators: dict[tuple[str, str], float], wall_ms: float) -> dict[str, float]:
    """ms per call in each category (CATEGORIES) and `wall`; unattributed is the wall time left."""
    totals: dict[str, float] = defaultdict(float)
    for (category, _), ms in operators.items():
        totals[category] += ms
    out = {c: round(totals.get(c, 0.0), 2) for c in CATEGORIES if c != "unattributed"}
    out["unattributed"] = round(max(0.0, wall_ms - sum(out.values())), 2)
    out["wall"] = round(wall_ms, 2)
    return out


def largest_outside_the_floor(operators: dict[tuple[str, str], float], wall_ms: float,
                              top: int = 3) -> dict[str, list[list]]:
    """The `top` largest operators or kernels of each category the arithmetic floor does not count
    (FLOOR_CATEGORIES are its matmuls and attention), as [name, ms per call], those of at least
    MIN_LISTED_SHARE of the wall time: where the time beyond the arithmetic goes. Unattributed is
    left out: by_category makes it the wall time the named categories leave, not a sum of operators."""
    largest: dict[str, list[list]] = {}
    for (category, name), ms in sorted(operators.items(), key=lambda item: -item[1]):
        if category in (*FLOOR_CATEGORIES, "unattributed") or ms < MIN_LISTED_SHARE * wall_ms:
            continue
        listed = largest.setdefault(category, [])
        if len(listed) < top:
            listed.append([name, round(ms, 2)])
    return largest


def format_profile(rows: list[dict]) -> list[str]:
    """The report's section: one line per profiled training row, ms per step and share, then the
    largest operators of each category outside the arithmetic floor, when the row has them."""
    profiled = [r for r in rows if r.get("profile_ms")]
    if not profiled:
        return []
    lines = ["", "where the time goes (torch.profiler, self CPU time per step in ms, share of the profiled "
                 "step's wall time; indented: the largest outside the arithmetic floor; bench/perf/profile.py)"]
    for r in profiled:
        p = r["profile_ms"]
        parts = ", ".join(f"{c} {p[c]:.0f} ({100 * p[c] / p['wall']:.0f}%)" for c in CATEGORIES if p.get(c))
        lines.append(f"  {r['name']}: {p['wall']:.0f} ms: {parts}")
        for category, listed in (r.get("profile_largest") or {}).items():
            lines.append(f"    {category}: " + ", ".join(f"{name} {ms:.1f} ms" for name, ms in listed))
    return lines

