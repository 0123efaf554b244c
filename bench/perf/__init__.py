"""Perf: `bench perf`, throughput of training, sampling, prepare and evaluation, with targets.

- `command`:  the command line (`main`)
- `run`:      configs -> workloads -> timing -> rows and targets (`run_perf`, `write_results`)
- `setup`:    model size, specs, precision policy and data the workloads run on
- `training`: the training-step workloads (the default row runs bench.train.step, as `bench train`)
- `official_step`: `--official PATH`, the official ReDi step from the user's checkout, timed beside the default
- `roofline`: the matmul peak (fp32, bf16), the model FLOPs of a training image, the arithmetic floor and
              the attention forms timed at the step's shape
- `profile`:  `--profile`: a training step's time by category (matmul, attention, elementwise, ...)
- `infer`:    sampling, Table 6 finished images, prepare and evaluation workloads
- `timing`:   warm-up, interleaved repeats, medians and the provenance every row carries
- `targets`:  the speed targets checked and the printed report
- `records`:  docs/performance.md's tables, generated from checked-in rows (one table per machine type)
- `weights`:  `bench weights`: the pretrained files a scale needs, checked against their published hashes
- `doctor`:   `bench doctor`: a preflight on the user's node (numerics, DDP, weights, data, throughput)
"""
