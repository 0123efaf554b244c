"""The tanh-approximated GELU in three forms, eager and under torch.compile, on the MLP activations
of the tiny perf model (64 x 64 x 1024): forward and forward + backward, medians of 9 paired rounds,
one thread, and the largest error against the float64 tanh form. It is why models.backbone.TanhGELU
takes the sigmoid form when compiled for a CPU (docs/performance.md).

    PYTHONPATH=$PWD python results/studies/embedded/gelu/gelu_forms.py bf16|fp32 OUT.json
"""

import json
import math
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

K = math.sqrt(2 / math.pi)
SHAPE = (64, 64, 1024)


def tanh_form(x):
    return F.gelu(x, approximate="tanh")


def sigmoid_form(x):  # 0.5 x (1 + tanh(u)) = x * sigmoid(2u), u = sqrt(2/pi)(x + 0.044715 x^3)
    return x * torch.sigmoid((2 * K) * (x + 0.044715 * x * x * x))


def timed(form, x0, grad):
    x = x0.clone().requires_grad_(True)
    start = time.perf_counter()
    y = form(x)
    middle = time.perf_counter()
    y.backward(grad)
    return middle - start, time.perf_counter() - start, y


def _cpu_model() -> str:
    with open("/proc/cpuinfo") as handle:
        return next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), "")


def main(precision: str, out: str) -> None:
    torch.set_num_threads(1)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[precision]
    forms = {"tanh eager": tanh_form, "sigmoid eager": sigmoid_form,
             "tanh compiled": torch.compile(tanh_form), "sigmoid compiled": torch.compile(sigmoid_form)}
    x0, grad = torch.randn(SHAPE, dtype=dtype), torch.randn(SHAPE, dtype=dtype)
    exact = F.gelu(x0.double(), approximate="tanh")
    for form in forms.values():  # compile and warm up
        for _ in range(3):
            timed(form, x0, grad)
    rounds = {name: [] for name in forms}
    for _ in range(9):  # round-robin: load on the machine lands on every form alike
        for name, form in forms.items():
            rounds[name].append(timed(form, x0, grad)[:2])
    record = {"precision": precision, "shape": SHAPE, "torch": torch.__version__,
              "machine": platform.processor() or platform.machine(), "cpu": _cpu_model(),
              "load_avg": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "forms": {}}
    for name, form in forms.items():
        y = timed(form, x0, grad)[2]
        record["forms"][name] = {
            "forward_ms": round(1000 * statistics.median(r[0] for r in rounds[name]), 2),
            "forward_backward_ms": round(1000 * statistics.median(r[1] for r in rounds[name]), 2),
            "max_relative_error": float((y.detach().double() - exact).abs().max() / exact.abs().max())}
        print(name, record["forms"][name])
    with open(out, "w") as handle:
        json.dump(record, handle, indent=1)
        handle.write("\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
