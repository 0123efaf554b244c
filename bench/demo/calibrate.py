"""`bench demo`'s first half-minute: measure this machine, then say what the whole demo will take.

The demo used to print its estimate after the first minute of *training*, which on a first run comes
after prepare (14 to 53 min measured on two 2-core machines): a user learnt the cost only after
paying most of it. Here, before any work starts, each stage's unit of work is timed on synthetic
data (random, never zeros) with the demo's own shapes, in as many processes at once as the stage
runs lanes and with the lanes' thread count (two lanes on one core each slow each other down:
shared caches, memory bandwidth, SMT siblings; timing them alone would promise too much):

    prepare   max(VAE steps x s/step, classifier steps x s/step)    the two train side by side
              + images x encoder s/image / lanes                    (first run only)
    train     the longest lane: sum over its cells of steps x s/step of the cell's spec, plus each
              cell's compile where train.compile resolves to compiling (timed on the warm cache
              the calibration's own cold compile leaves, as the cells find it)
    evaluate  the longest lane of evaluation jobs (one per cell and sampling setting, as the eval
              stage submits them): per evaluation samples x (solver steps x s per image-step of its
              guidance mode + s per sample to decode and score it) + EVAL_OVERHEAD_S,
              x (1 - the lane-seconds training leaves idle / all jobs' seconds): the lanes that end
                training first evaluate finished cells while the last cells train
                (bench.demo.idle_lane), at most all jobs but the largest
              + reference images x s per image to score   (first run: each lane's first job
                                                           computes the reference statistics)

Guided modes are timed, not scaled from the unguided step: the guided passes run as one batch of
twice the images, which cost 2.2-3.1x the unguided step per image on a 2-vCPU Xeon without AMX
(two measurements, both lanes busy).

The estimate is what this machine can do *now*: other load that starts later slows the demo down,
and the progress line's time left (from the runs' own measured speed) follows it.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field, fields
from typing import Optional, Sequence

from bench.launch.plan import assign_lanes
from bench.process_lanes import lane_pool

SECONDS_PER_WORKLOAD = 2.0  # timed per workload and lane, after one warm-up call
EVAL_OVERHEAD_S = 3.0  # per evaluation: loading the checkpoint, decoder and classifier (measured ~2-4 s)


@dataclass(frozen=True)
class Costs:
    """Seconds per unit of work on this machine, every lane busy at once (medians over lanes)."""

    train_step_s: dict
    """spec -> seconds per training step at the demo's batch."""
    sample_step_s: dict
    """guidance mode ("none", "cfg", "rg", "cfg+rg") -> seconds per image x solver step, the mode's
    passes batched in one call as the sampler runs them."""
    train_compile_s: dict = field(default_factory=dict)
    """spec -> seconds a run of the spec spends compiling its step (absent: the step runs eagerly)."""
    vae_step_s: Optional[float] = None
    classifier_step_s: Optional[float] = None
    encode_image_s: Optional[float] = None
    """Prepare's units (None when the prepared data is cached)."""
    decode_image_s: float = 0.0
    """Seconds per sample to decode its latents with the VAE."""
    score_image_s: float = 0.0
    """Seconds per image for the classifier's features and logits (samples and reference)."""
    lanes: int = 1
    threads: int = 1
    seconds: float = 0.0
    """How long the measurement took."""

    def units(self) -> dict:
        """The measured units, rounded, for the demo's record: what each stage's estimate came from."""
        def rounded(value):
            if isinstance(value, dict):
                return {key: rounded(v) for key, v in value.items()}
            return None if value is None else float(f"{value:.4g}")
        skip = ("lanes", "threads", "seconds")
        return {f.name: rounded(getattr(self, f.name)) for f in fields(self) if f.name not in skip}

    def evaluation_s(self, samples: int, steps: int, mode: str) -> float:
        """Seconds of one evaluation: sampling in guidance `mode` (a mode not timed costs its passes
        times the unguided step), decoding and scoring every sample, and the evaluation's overhead."""
        step_s = self.sample_step_s.get(mode, passes(mode) * self.sample_step_s.get("none", 0.0))
        return samples * (steps * step_s + self.decode_image_s + self.score_image_s) + EVAL_OVERHEAD_S


def guidance_mode(cfg_scale: float, rg_scale: float) -> str:
    """The sampler's guidance mode of these scales: none, cfg, rg or cfg+rg (bench.perf.infer's names)."""
    return "+".join(name for name, on in (("cfg", cfg_scale != 1.0), ("rg", rg_scale != 1.0)) if on) or "none"


def passes(mode: str) -> int:
    """Network evaluations per image and solver step in guidance `mode`."""
    return 1 if mode == "none" else 1 + len(mode.split("+"))


def _time(run, budget_s: float) -> float:
    """Median seconds per call of `run` over about `budget_s` (one warm-up call first)."""
    run()
    times, spent = [], 0.0
    while spent < budget_s or len(times) < 3:
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
        spent += times[-1]
    return statistics.median(times)


def _measure_lane(job: dict) -> dict:
    """One lane's measurements (runs in a bench.process_lanes process, so each lane owns its threads)."""
    import torch

    from bench.compose import load_config
    from bench.perf.setup import synthetic_geometry, synthetic_pool
    from bench.perf.training import StepOptions, build_train_workload
    from bench.precision import resolve_precision
    from bench.train.step import resolve_compile

    cpu = torch.device("cpu")
    out: dict = {"train": {}}
    for spec, overrides in job["specs"].items():
        cfg = load_config(overrides)
        geometry = synthetic_geometry(cfg)
        pool = synthetic_pool(geometry, cfg.train.batch_size, max(cfg.semantic_channels, 1), cpu)
        precision = "fp32" if resolve_precision(cfg.train.precision, cpu) is None else "bf16"  # as bench train
        options = StepOptions(precision=precision, compile=resolve_compile(cfg.train.compile, cpu,
                                                                           cfg.train.max_steps))
        workload = build_train_workload(spec, cfg, geometry, pool, cpu, options)
        out["train"][spec] = _time(workload.run, job["budget_s"])
        if options.compile:
            out.setdefault("compile", {})[spec] = _warm_compile_s(spec, cfg, geometry, pool, options,
                                                                  out["train"][spec])
        for mode, (sample_spec, batch) in job["sampling"].items():
            if sample_spec == spec:
                out.setdefault("sample_step_s", {})[mode] = _sample_step_s(spec, cfg, geometry, mode, batch,
                                                                           job["budget_s"])
    if job["sampling"]:  # the image size and latent grid every spec shares
        out.update(_measure_finish(cfg, geometry, *job["finish"], job["budget_s"]))
    if job["prepare"]:
        out.update(_measure_prepare(job["budget_s"], *job["prepare"]))
    return out


def _sample_step_s(spec: str, cfg, geometry, mode: str, batch: int, budget_s: float) -> float:
    """Seconds per image of one solver step in guidance `mode` at the evaluation's batch, in the
    precision the evaluation samples in."""
    import torch

    from bench.evaluate.sampling import sampling_precision
    from bench.perf.infer import build_sample_workloads

    cpu = torch.device("cpu")
    workloads = build_sample_workloads(spec, cfg, geometry, batch, cpu, sampling_precision(cfg, cpu))
    workload = next(w for w in workloads if w.fields["guidance"] == mode)
    return _time(workload.run, budget_s) / batch


def _measure_finish(cfg, geometry, vae_settings, cls_settings, batch: int, budget_s: float) -> dict:
    """Seconds per sample of what an evaluation does after sampling, at its batch: decode the
    latents with the embedded VAE of `vae_settings` (in fp32, as bench.evaluate.sampling decodes)
    and score the images with the classifier of `cls_settings` (features and logits), random
    weights and inputs of the evaluation's shapes."""
    import torch

    from bench.evaluate.features import ModuleFeatures
    from bench.prepare import embedded

    g = torch.Generator().manual_seed(0)
    size = cfg.data.image_size
    vae = embedded.build_embedded_vae(vae_settings, image_size=size).eval().requires_grad_(False)
    latents = torch.randn(batch, geometry.latent_channels, geometry.latent_grid, geometry.latent_grid, generator=g)
    classifier = ModuleFeatures(embedded.EvalClassifier(cfg.data.num_classes, cls_settings.width,
                                                        cls_settings.feature_dim),
                                network_id="calibration", weights_sha256="-", feature_dim=cls_settings.feature_dim)
    images = torch.randint(0, 256, (batch, 3, size, size), generator=g, dtype=torch.uint8)

    @torch.no_grad()
    def decode() -> None:
        vae.decode(latents)

    return {"decode_image_s": _time(decode, budget_s) / batch,
            "score_image_s": _time(lambda: classifier.outputs(images, logits=True), budget_s) / batch}


def _warm_compile_s(spec: str, cfg, geometry, pool, options, step_s: float) -> float:
    """What a training run pays to compile its step once the calibration's own compile has filled
    inductor's on-disk cache: the first call of a freshly compiled step, less one step."""
    import torch

    from bench.perf.training import build_train_workload

    torch._dynamo.reset()  # forget the in-memory compile, as a new process would; the disk cache stays
    workload = build_train_workload(spec, cfg, geometry, pool, torch.device("cpu"), options)
    start = time.perf_counter()
    workload.run()
    return max(time.perf_counter() - start - step_s, 0.0)


def _measure_prepare(budget_s: float, vae_settings, cls_settings, encode_batch: int, precision: str) -> dict:
    """One step of the embedded VAE and of the evaluation classifier (the settings prepare will
    train with), and the encoders per image at prepare's own encoder batch (`encode_batch`: on a
    2-vCPU AMD EPYC, EfficientNet-Lite0 ran at ~150 images/s per lane at batch 16 and ~75 at batch
    64, so timing another batch than prepare's misstates the encoding by up to 2x). `precision`
    (fp32 or bf16) is encoder.precision as prepare resolves it: the semantic encoder runs in it,
    the VAE and the classifier in fp32, as prepare runs them."""
    import torch
    import torch.nn.functional as F

    from bench.prepare import embedded
    from bench.prepare.encoders import build_efficientnet_lite0
    from bench.prepare.pca import PCAStats

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (max(vae_settings.batch_size, cls_settings.batch_size, encode_batch), 3, 32, 32),
                           generator=g, dtype=torch.uint8)
    vae = embedded.build_embedded_vae(vae_settings, image_size=32)
    vae_opt = torch.optim.AdamW(vae.parameters(), lr=vae_settings.lr)

    dtype = torch.bfloat16 if precision == "bf16" else None

    def vae_step() -> None:
        mse, kl = embedded.vae_losses(vae, embedded.to_unit_range(images[: vae_settings.batch_size]), g)
        vae_opt.zero_grad(set_to_none=True)
        (mse + vae_settings.kl_weight * kl).backward()
        vae_opt.step()

    classifier = embedded.EvalClassifier(10, cls_settings.width, cls_settings.feature_dim).to(
        memory_format=torch.channels_last)  # as train_classifier runs it
    cls_opt = torch.optim.AdamW(classifier.parameters(), lr=cls_settings.lr)
    labels = torch.randint(0, 10, (cls_settings.batch_size,), generator=g)
    cls_images = images[: cls_settings.batch_size].contiguous(memory_format=torch.channels_last)

    def classifier_step() -> None:
        loss = F.cross_entropy(classifier.logits(cls_images), labels)
        cls_opt.zero_grad(set_to_none=True)
        loss.backward()
        cls_opt.step()

    encoder = build_efficientnet_lite0(32)
    batch = images[:encode_batch]
    stats = PCAStats(encoder.info.channels)

    @torch.no_grad()
    def encode() -> None:  # prepare's pass 1: VAE moments, encoder features, their float64 PCA sums
        vae.encode(embedded.to_unit_range(batch))
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            features = encoder.encode(batch)
        stats.update(features.permute(0, 2, 3, 1).reshape(-1, features.shape[1]))

    return {"vae_step_s": _time(vae_step, budget_s), "classifier_step_s": _time(classifier_step, budget_s),
            "encode_image_s": _time(encode, budget_s) / len(batch)}


def measure(spec_overrides: dict, sampling: dict, finish: tuple, lanes: int, threads: int,
            prepare: Optional[tuple], budget_s: float = SECONDS_PER_WORKLOAD) -> Costs:
    """Time every unit in `lanes` processes at once (`threads` each); medians over the lanes.

    `spec_overrides`: spec -> the config overrides of one of its cells (the demo's own shapes);
    `sampling`: guidance mode -> (spec, batch) of an evaluation that samples in it; `finish`:
    (EmbeddedVAESettings, ClassifierSettings, batch) of the decoder and classifier the evaluations
    use and the batch they run at;
    `prepare`: (EmbeddedVAESettings, ClassifierSettings, encoder batch, precision) on a first run,
    else None."""
    started = time.time()
    job = {"specs": spec_overrides, "sampling": sampling, "finish": finish, "threads": threads,
           "prepare": prepare, "budget_s": budget_s}
    with lane_pool(lanes, threads) as pool:
        results = list(pool.map(_measure_lane, [job] * lanes))

    def median(key: str, sub: Optional[str] = None, default=None):
        values = [r.get(key, {}).get(sub) if sub else r.get(key) for r in results]
        values = [v for v in values if v is not None]
        return statistics.median(values) if values else default

    compiled = [spec for spec in spec_overrides if all(spec in r.get("compile", {}) for r in results)]
    return Costs(train_step_s={spec: median("train", spec) for spec in spec_overrides},
                 train_compile_s={spec: median("compile", spec) for spec in compiled},
                 sample_step_s={mode: median("sample_step_s", mode) for mode in sampling},
                 decode_image_s=median("decode_image_s", default=0.0),
                 score_image_s=median("score_image_s", default=0.0),
                 vae_step_s=median("vae_step_s"), classifier_step_s=median("classifier_step_s"),
                 encode_image_s=median("encode_image_s"), lanes=lanes, threads=threads,
                 seconds=time.time() - started)


@dataclass(frozen=True)
class Estimate:
    prepare_s: float
    train_s: float
    eval_s: float

    @property
    def total_s(self) -> float:
        return self.prepare_s + self.train_s + self.eval_s


def lane_split(items: Sequence, costs: Sequence[float], lanes: int) -> list[list]:
    """How the local launcher deals a stage's jobs into lanes (bench.launch.plan.assign_lanes)."""
    return [[items[i] for i in group] for group in assign_lanes(list(costs), lanes)] if items else []


def estimate(costs: Costs, train_cells: Sequence[tuple[str, int]], eval_jobs: Sequence[Sequence[tuple[int, int, str]]],
             prepare_counts: Optional[dict]) -> Estimate:
    """Seconds of each stage.

    train_cells: (spec, steps still to train) per cell, in submission order; eval_jobs: per
    evaluation job still to run, its evaluations (samples, solver steps, guidance mode);
    prepare_counts: {"vae_steps", "classifier_steps", "images", "reference_images"} on a first
    run, else None."""
    lanes = costs.lanes
    seconds = [steps * costs.train_step_s[spec] + (costs.train_compile_s.get(spec, 0.0) if steps else 0.0)
               for spec, steps in train_cells]
    train_lanes = [sum(lane) for lane in lane_split(seconds, seconds, lanes)]
    train = max(train_lanes, default=0.0)
    jobs = [sum(costs.evaluation_s(*evaluation) for evaluation in job) for job in eval_jobs]
    evaluate = max((sum(lane) for lane in lane_split(jobs, jobs, lanes)), default=0.0)
    # Lanes whose cells are done evaluate while the last cells train (bench.demo.idle_lane), up to
    # all but the largest job (a cell still training keeps its own); the eval stage's lanes are left
    # the rest, in the same proportion.
    idle = sum(train - load for load in train_lanes) + (lanes - len(train_lanes)) * train
    if jobs:
        evaluate *= 1.0 - min(idle, sum(jobs) - max(jobs)) / sum(jobs)
    if prepare_counts and jobs:  # the first evaluation scores the new classifier's reference
        evaluate += prepare_counts.get("reference_images", 0) * costs.score_image_s
    prepare = 0.0
    if prepare_counts and costs.vae_step_s is not None:
        prepare = max(prepare_counts["vae_steps"] * costs.vae_step_s,
                      prepare_counts["classifier_steps"] * costs.classifier_step_s) \
            + prepare_counts["images"] * costs.encode_image_s / lanes
    return Estimate(prepare, train, evaluate)
