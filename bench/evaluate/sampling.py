"""`bench sample`: images from a run folder's checkpoint, sharded, resumable and reproducible.

Everything is rebuilt from the run folder: `config.json` (never flags retyped by hand), the prepared
manifest it points at (latent channels and grid, the VAE and its scaling factor) and the checkpoint
weights (EMA or raw). Only `eval.*` keys may be overridden at sampling time.

Layout: `<run_dir>/samples/<step:07d>/<setting-hash>/`
    plan.json              the sampling setting the hash covers (sampler, steps, guidance, seed, ...)
    shard-00000.npz ...    images uint8 (n, H, W, 3) (the ADM .npz layout), labels int64 (n,),
                           count, format, seconds; shard 0 also keeps `semantic_grid`, the generated
                           semantic channels (g, C_z, h, w) float32 of its first g grid images
    grid.png               the first g images
    grid_semantic_pca.png  their semantic channels as RGB through 3 principal components (Fig. 5)

Shard i holds images [i * shard_size, min((i + 1) * shard_size, N)). Its labels come from a generator
seeded by (eval seed, shard index) only, and it is sampled in batches of `eval.batch_size`, batch j
with noise from a generator seeded by (eval seed, shard index, j), so shard i is the same whether it
is sampled first, last, alone, after a kill, or by another array task, and two specs with the same
eval seed share labels and initial latent noise x_T in every batch (paired comparisons). Both the
shard size and the batch size are part of the setting hash
(the batch size fixes how the noise stream is cut into network calls). The number of samples is
not: asking for more samples later adds shards to the same folder and reuses the finished ones.
Each shard is written atomically (temporary name, then os.replace); a shard that is unreadable or
holds another count is sampled again.

Decoding is the official one: only the latent channels go to the VAE, divided by the scaling factor
the latents were trained with (`LatentVAE.decode`), then quantised to uint8 exactly once by
`bench.evaluate.quality.to_uint8` (DiT/SiT rounding). The semantic channels are not decoded.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
import torch

from bench.atomic import atomic_write_bytes, atomic_write_json, crash_point, sha256_json
from bench.compose import from_dict, to_dict
from bench.config import ConfigError, ExperimentConfig
from bench.evaluate.quality import to_uint8
from bench.precision import resolve_precision
from bench.prepare.dataset import PreparedDataError, read_manifest
from bench.prepare.encoders import EncoderError, load_vae
from bench.progress import Progress
from bench.run_hash import derive_seed, run_hash
from bench.runfolder import (
    checkpoint_path,
    checkpoint_steps,
    checkpoints_dir,
    config_path,
    read_run_config,
    samples_dir,
)
from bench.site import apply_site, load_site, site_paths_of
from bench.train.build import build_model, build_transport
from bench.train.checkpoint import WEIGHTS_FILE, CorruptCheckpointError, load_weights, read_meta
from models.ddpm_sampling import sample_ddpm
from models.flow_sampling import sample_flow
from models.guidance import Guidance

SHARD_FORMAT = "redi-bench-samples/1"
DEFAULT_SHARD_SIZE = 1000
GRID_SAMPLES = 64


def sampling_precision(cfg: ExperimentConfig, device: torch.device) -> str:
    """"fp32" or "bf16": eval.precision resolved on `device` (auto = bf16 where it is native)."""
    return "fp32" if resolve_precision(cfg.eval.precision, device, "eval.precision") is None else "bf16"


def in_precision(model, precision: str, device: torch.device):
    """`model` called under bf16 autocast when `precision` is "bf16", its outputs returned in fp32,
    so the sampler's updates, guidance's differences and the decoder stay in fp32."""
    if precision == "fp32":
        return model

    def call(*args, **kwargs):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = model(*args, **kwargs)
        return type(out)(*(None if part is None else part.float() for part in out))
    return call


class SamplingError(ValueError):
    """A run folder, checkpoint or sampling request is unusable; the message says what to do."""


# ---------------------------------------------------------------------------------------------
# The run: config, overrides, manifest, model, VAE


def resolve_run_config(run_dir: Path, cfg: Optional[ExperimentConfig] = None,
                       overrides: Iterable[str] = ()) -> ExperimentConfig:
    """The run's saved config with this machine's paths and the evaluation settings of `cfg`
    (when given, e.g. a grid's setting from the launcher), then `overrides` on top. The model and
    data come from config.json; a `cfg` that describes another run (other run hash) is refused.

    The paths (bench.site.SITE_KEYS: VAE, encoder, Inception, reference, data, output root) are
    the site file's, applied on top of the saved ones; with `cfg` they are cfg's, which the
    launcher composed with the site file at submission, so a queued job needs no site file of its
    own."""

    saved = read_run_config(run_dir)
    if cfg is not None:
        if run_hash(cfg) != run_hash(saved):
            raise SamplingError(f"the given config describes another run (hash {run_hash(cfg)}) than "
                                f"{config_path(run_dir)} (hash {run_hash(saved)}); only its "
                                "eval.* settings may differ")
        saved = site_paths_of(cfg, saved)
        saved = dataclasses.replace(saved, eval=copy.deepcopy(cfg.eval))  # re-validated
    else:
        saved = apply_site(saved, load_site())
    return apply_eval_overrides(saved, overrides)


def resolve_device(device) -> torch.device:
    """--device as given (None: cuda when available), refused at once when it cannot run here."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise SamplingError(f"--device {device!r} is not a device; use cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise SamplingError(f"--device {device}: no CUDA device is visible on this machine "
                            "(torch.cuda.is_available() is False); use --device cpu, or leave "
                            "--device out to use a GPU only when there is one")
    if resolved.type not in ("cpu", "cuda"):
        raise SamplingError(f"--device {device!r}: only cpu and cuda are supported")
    return resolved


def apply_eval_overrides(cfg: ExperimentConfig, overrides: Iterable[str]) -> ExperimentConfig:
    """`cfg` with `eval.key=value` overrides applied (validated like any config). Training keys are
    refused: the model must be the one the checkpoints were trained as."""
    from omegaconf import OmegaConf

    overrides = list(overrides)
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if "=" not in item or not key.startswith("eval."):
            raise ConfigError(f"override {item!r}: only eval.key=value overrides are allowed at "
                              "sampling/evaluation time; the model and data come from the run's "
                              "config.json")
    if not overrides:
        return cfg
    try:
        merged = OmegaConf.merge(OmegaConf.create(to_dict(cfg)), OmegaConf.from_dotlist(overrides))
    except Exception as err:  # omegaconf's own errors: unknown key, bad type
        raise ConfigError(f"overrides {overrides}: {str(err).splitlines()[0]}") from None
    try:
        return from_dict(OmegaConf.to_container(merged))
    except ConfigError as err:
        cause = err.__cause__ if isinstance(err.__cause__, ConfigError) else err
        text = str(cause).removeprefix("saved config is not valid for this version of redi-bench: ")
        raise ConfigError(f"overrides {overrides}: {text}") from None


def read_run_manifest(cfg: ExperimentConfig) -> dict:
    """The prepared manifest of the run's data (`data.prepared_dir`)."""

    try:
        return read_manifest(cfg.data.prepared_dir)
    except PreparedDataError as err:
        raise SamplingError(f"data.prepared_dir of the run: {err}") from None


def require_checkpoint(run_dir: Path, step: int) -> Path:
    """The folder of checkpoint `step`, or one SamplingError listing what exists."""
    available = checkpoint_steps(run_dir)
    if not available:
        raise SamplingError(f"{checkpoints_dir(run_dir)} holds no checkpoints; train the run "
                            "first (`bench train`)")
    if step not in available:
        raise SamplingError(f"{run_dir} has no checkpoint at step {step}; available steps: {available}")
    return checkpoint_path(Path(run_dir), step)


EMA_INIT_WARNING = 0.05


def ema_init_weight(decay: float, step: int) -> float:
    """The weight the EMA still gives the initial network after `step` updates: it starts as a
    copy of the initial weights (official), and each update keeps `decay` of the old average."""
    return float(decay) ** int(step)


def warn_if_ema_is_mostly_init(cfg: ExperimentConfig, step: int) -> None:
    """A short run sampled from an EMA with a long horizon measures the initialisation: warn."""
    share = ema_init_weight(cfg.train.ema_decay, step)
    if cfg.eval.use_ema and share > EMA_INIT_WARNING:
        import warnings

        warnings.warn(f"the EMA at step {step} still gives the initial weights {share:.0%} "
                      f"(train.ema_decay={cfg.train.ema_decay} ** {step}); its samples measure "
                      "the initialisation. Train longer, lower train.ema_decay, or set "
                      "eval.use_ema=false", RuntimeWarning, stacklevel=3)


def load_sampling_model(run_dir: Path, cfg: ExperimentConfig, manifest: dict, step: int,
                        use_ema: bool, device: torch.device) -> tuple[torch.nn.Module, str]:
    """The network of checkpoint `step` (EMA or raw weights, verified), in eval mode on `device`,
    and the sha256 of its weights file."""

    folder = require_checkpoint(run_dir, step)
    try:
        state = load_weights(folder, "ema" if use_ema else "model")
        weights_sha = read_meta(folder)["sha256"][WEIGHTS_FILE]
    except CorruptCheckpointError as err:
        raise SamplingError(f"checkpoint {step} of {run_dir} is unusable: {err}") from None
    model = build_model(cfg, manifest)
    # The REPA projector only feeds the training-time alignment loss; without it the forward skips
    # one MLP over every token at each of the sampler's network calls. Dropped before loading: its
    # output size is the alignment encoder's, which data.align_prepared_dir may set apart from the
    # manifest's encoder (and that folder need not be present where the run is sampled).
    model.projector = None
    model.load_state_dict({k: v for k, v in state.items() if not k.startswith("projector.")})
    return model.to(device).eval().requires_grad_(False), weights_sha


def load_decoder(cfg: ExperimentConfig, manifest: dict, device: torch.device):
    """The VAE of the prepared data (`bench.prepare.encoders.LatentVAE`), checked against the manifest's
    scaling factor: the latents were trained as (mean + std eps) * that factor."""

    prepared = Path(cfg.data.prepared_dir)
    try:
        vae = load_vae(cfg.vae, embedded_dir=prepared / manifest["vae"].get("path", "vae"))
    except EncoderError as err:
        raise SamplingError(str(err)) from None
    trained, decoding = float(manifest["scaling_factor"]), vae.info.scaling_factor
    if not math.isclose(trained, decoding, rel_tol=1e-6):
        raise SamplingError(f"the run's latents were scaled by {trained} (prepared manifest) but the "
                            f"VAE found decodes with {decoding}; point vae.path at the VAE that "
                            "prepared the data")
    if vae.info.latent_channels != int(manifest["latent_channels"]):
        raise SamplingError(f"the VAE has {vae.info.latent_channels} latent channels, the prepared "
                            f"latents {manifest['latent_channels']}")
    return vae.to(device)


def build_guidance(cfg: ExperimentConfig, manifest: dict):
    """`models.guidance.Guidance` of `cfg.eval.guidance` for this run's channels and classes."""

    g = cfg.eval.guidance
    if g.cfg_scale != 1.0:
        if not cfg.model.conditional:
            raise ConfigError("eval.guidance.cfg_scale != 1 needs a class-conditional model; this run "
                              "is unconditional (model.conditional=false)")
        if cfg.model.class_dropout_prob <= 0:
            raise ConfigError("eval.guidance.cfg_scale != 1 needs the null label, but the run was "
                              "trained with model.class_dropout_prob=0; use cfg_scale=1")
    if g.rg_scale != 1.0 and cfg.objective.p_drop <= 0:
        import warnings

        warnings.warn("eval.guidance.rg_scale != 1 on a run trained with objective.p_drop=0: the "
                      "model never saw a dropped semantic input (the paper trains with 0.2)",
                      RuntimeWarning, stacklevel=2)
    return Guidance(latent_channels=int(manifest["latent_channels"]),
                    semantic_channels=cfg.semantic_channels, cfg_scale=g.cfg_scale,
                    cfg_channels=g.cfg_channels, interval=(g.interval_low, g.interval_high),
                    rg_scale=g.rg_scale, rg_channels=g.rg_channels,
                    null_class=cfg.num_model_classes)


# ---------------------------------------------------------------------------------------------
# The setting: everything that decides the images


@dataclass
class SamplingSetting:
    """What the samples folder's hash covers; recorded in plan.json and every eval row."""

    step: int
    weights: str  # "ema" or "raw"
    weights_sha256: str
    prepared_settings_hash: str  # the VAE that decodes (and the data) belong to the prepare
    sampler: str
    num_sampling_steps: int
    guidance: dict  # every GuidanceConfig field
    seed: int
    label_sampling: str
    num_classes: int
    shard_size: int
    batch_size: int
    precision: str = "fp32"  # the network's, resolved (sampling_precision)
    format: str = SHARD_FORMAT
    noise: str = "per_batch"  # one noise stream per (shard, batch); shards of the older per-shard stream are not reused

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def hash(self) -> str:
        return sha256_json(self.to_json())[:16]


def sampling_setting(cfg: ExperimentConfig, manifest: dict, step: int, weights_sha256: str,
                     shard_size: int, device: torch.device) -> SamplingSetting:
    """What the samples of (cfg, step) depend on; `device`, the one that samples, resolves
    eval.precision."""
    if shard_size < 1:
        raise SamplingError(f"shard_size must be >= 1, got {shard_size}")
    e = cfg.eval
    return SamplingSetting(
        step=int(step), weights="ema" if e.use_ema else "raw", weights_sha256=weights_sha256,
        prepared_settings_hash=str(manifest.get("settings_hash")), sampler=e.sampler,
        num_sampling_steps=e.num_sampling_steps, guidance=dataclasses.asdict(e.guidance),
        seed=e.seed, label_sampling=e.label_sampling, num_classes=cfg.num_model_classes,
        shard_size=int(shard_size), batch_size=e.batch_size,
        precision=sampling_precision(cfg, device))


def samples_folder(run_dir: Path, setting: SamplingSetting) -> Path:
    """Where the shards of `setting` live (bench.runfolder's samples/<step>/<setting hash>)."""
    return samples_dir(run_dir, setting.step, setting.hash)


def shard_path(folder: Path, index: int) -> Path:
    return Path(folder) / f"shard-{index:05d}.npz"


def shard_counts(num_samples: int, shard_size: int) -> list[int]:
    """Images per shard: full shards and one shorter last shard."""
    return [min(shard_size, num_samples - start) for start in range(0, num_samples, shard_size)]


def shard_is_finished(path: Path, count: int) -> bool:
    """True when `path` is a readable shard of this format holding exactly `count` images (only the
    small members are read)."""
    if not path.is_file():
        return False
    try:
        with np.load(path, allow_pickle=False) as npz:
            return ("images" in npz.files and str(npz["format"]) == SHARD_FORMAT
                    and int(npz["count"]) == count)
    except Exception:  # truncated or foreign file: sample it again
        return False


def read_shard(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as npz:
        return {key: npz[key] for key in npz.files}


# ---------------------------------------------------------------------------------------------
# Drawing one shard


def shard_labels(start: int, count: int, num_classes: int, mode: str,
                 generator: torch.Generator) -> torch.Tensor:
    """(count,) int64 labels of images [start, start + count). `random`: uniform (DiT/SiT/ReDi);
    `balanced`: global index modulo the class count, shuffled within the shard, so the first N
    images hold every class floor(N/K) or ceil(N/K) times, whatever the shard size."""
    if num_classes == 1:
        return torch.zeros(count, dtype=torch.long)  # unconditional model: the one class
    if mode == "random":
        return torch.randint(0, num_classes, (count,), generator=generator, dtype=torch.long)
    labels = torch.arange(start, start + count, dtype=torch.long) % num_classes
    return labels[torch.randperm(count, generator=generator)]


def _derive_seed(seed: int, *names: object) -> int:
    """Sampling's streams of the run's seed (bench.run_hash.derive_seed, shared with training)."""
    return derive_seed(seed, "sampling", *names)


@torch.no_grad()
def draw_batch(model, transport, guidance, cfg: ExperimentConfig, manifest: dict, y: torch.Tensor,
               generator: torch.Generator, device: torch.device
               ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """One batch of (latents (B, C_x, h, w), semantic (B, C_z, h, w) or None) at t = data."""

    h, w = (int(v) for v in manifest["latent_grid"])
    b = int(y.shape[0])
    shape_x = (b, int(manifest["latent_channels"]), h, w)
    shape_z = (b, cfg.semantic_channels, h, w) if cfg.semantic_channels else None
    y = y.to(device)
    model = in_precision(model, sampling_precision(cfg, device), device)
    if cfg.eval.sampler == "ddpm":
        return sample_ddpm(model, shape_x, shape_z, y, guidance, cfg.eval.num_sampling_steps,
                           generator=generator, diffusion=transport.diffusion, device=device)
    return sample_flow(model, shape_x, shape_z, y, guidance, cfg.eval.sampler,
                       cfg.eval.num_sampling_steps, generator=generator,
                       path=cfg.objective.path, device=device)


@torch.no_grad()
def decode_to_uint8(vae, latents: torch.Tensor, image_size: int) -> np.ndarray:
    """Latent channels (B, C_x, h, w) -> uint8 (B, H, W, 3), quantised once (metrics.to_uint8)."""

    images = vae.decode(latents.float())  # (B, 3, H, W) in [-1, 1]
    if tuple(images.shape[-2:]) != (image_size, image_size):
        raise SamplingError(f"the VAE decodes {tuple(images.shape[-2:])} images but data.image_size="
                            f"{image_size}; the prepared VAE does not belong to this run")
    return to_uint8(images.float()).permute(0, 2, 3, 1).cpu().numpy()


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # uncompressed: members read lazily (count without the images)
    atomic_write_bytes(path, buffer.getvalue())


# ---------------------------------------------------------------------------------------------
# The driver


@dataclass
class SampleSet:
    """Where the samples of one (run, step, setting) live and whether all N are there."""

    folder: Path
    setting: SamplingSetting
    num_samples: int
    counts: list[int]
    sampled_now: int
    seconds_now: float

    @property
    def shards(self) -> list[Path]:
        return [shard_path(self.folder, i) for i in range(len(self.counts))]

    @property
    def complete(self) -> bool:
        return all(shard_is_finished(p, n) for p, n in zip(self.shards, self.counts))

    def sampling_seconds(self) -> float:
        """Sampling time of all shards as recorded in them (covers earlier, resumed calls)."""
        total = 0.0
        for path in self.shards:
            with np.load(path, allow_pickle=False) as npz:
                total += float(npz["seconds"])
        return total


def sample(run_dir: Path, step: Optional[int] = None, cfg: Optional[ExperimentConfig] = None, *,
           overrides: Sequence[str] = (), num_samples: Optional[int] = None,
           shard_size: int = DEFAULT_SHARD_SIZE, task_index: int = 0, num_tasks: int = 1,
           max_shards: Optional[int] = None, device: Optional[torch.device | str] = None,
           progress: bool = True) -> SampleSet:
    """Sample `num_samples` (default eval.num_samples) images of checkpoint `step` (default: the
    latest) with the eval settings of `cfg` (None: the saved config's) plus `overrides` (eval.*
    keys); the model itself is always rebuilt from config.json (`resolve_run_config`).

    Array tasks: task `task_index` of `num_tasks` samples shards i with i % num_tasks == task_index
    (give them explicitly; SLURM variables are not read, since the eval stage may be one array task
    per run). `max_shards` stops after that many new shards (to split the work in time, and in
    tests to simulate a kill). Finished shards are skipped, so calling again resumes.
    """
    run_dir = Path(run_dir)
    cfg = resolve_run_config(run_dir, cfg, overrides)
    if not 0 <= task_index < num_tasks:
        raise SamplingError(f"task index {task_index} of {num_tasks} tasks is invalid (0 <= index < count)")
    manifest = read_run_manifest(cfg)
    if step is None:
        available = checkpoint_steps(run_dir)
        step = available[-1] if available else -1
    require_checkpoint(run_dir, int(step))
    device = resolve_device(device)
    total = int(num_samples if num_samples is not None else cfg.eval.num_samples)
    if total < 1:
        raise SamplingError(f"num_samples must be >= 1, got {total}")
    guidance = build_guidance(cfg, manifest)  # validates before any file is written
    warn_if_ema_is_mostly_init(cfg, int(step))
    model, weights_sha = load_sampling_model(run_dir, cfg, manifest, int(step), cfg.eval.use_ema, device)
    setting = sampling_setting(cfg, manifest, int(step), weights_sha, shard_size, device)
    folder = samples_folder(run_dir, setting)
    counts = shard_counts(total, setting.shard_size)
    todo = [i for i in range(len(counts)) if i % num_tasks == task_index
            and not shard_is_finished(shard_path(folder, i), counts[i])]
    if max_shards is not None:
        todo = todo[:max(0, int(max_shards))]
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / "plan.json", setting.to_json() | {"hash": setting.hash})

    sampled, began = 0, time.perf_counter()
    if todo:
        transport = build_transport(cfg, manifest)
        vae = load_decoder(cfg, manifest, device)
        # A bar on a terminal; in a batch job's log, a plain line every REDI_BENCH_PROGRESS_EVERY seconds.
        with Progress(f"sample step {step}: images", sum(counts[i] for i in todo), enabled=progress) as bar:
            for index in todo:
                _sample_shard(folder, index, counts[index], setting, cfg, manifest, model,
                              transport, guidance, vae, device, bar)
                crash_point("sample:shard")
                sampled += counts[index]
    result = SampleSet(folder, setting, total, counts, sampled, time.perf_counter() - began)
    if shard_is_finished(shard_path(folder, 0), counts[0]) and not (folder / "grid.png").is_file():
        save_sample_grids(folder)
    return result


def _sample_shard(folder: Path, index: int, count: int, setting: SamplingSetting,
                  cfg: ExperimentConfig, manifest: dict, model, transport, guidance, vae,
                  device: torch.device, bar) -> None:
    began = time.perf_counter()
    start = index * setting.shard_size
    label_generator = torch.Generator().manual_seed(_derive_seed(setting.seed, "labels", index))
    labels = shard_labels(start, count, setting.num_classes, setting.label_sampling, label_generator)
    images, semantic = [], []
    grid_count = min(GRID_SAMPLES, count) if index == 0 else 0
    for offset in range(0, count, setting.batch_size):
        # One noise stream per batch (setting.noise = "per_batch"): the sampler draws x_T before z_T,
        # so a latent-only and a joint model with the same eval seed start every batch from the same
        # x_T (common random numbers for paired comparisons); one stream per shard would let the
        # joint model's z draws shift the latent noise of every later batch.
        noise_generator = torch.Generator().manual_seed(
            _derive_seed(setting.seed, "noise", index, offset // setting.batch_size))
        y = labels[offset: offset + setting.batch_size]
        x, z = draw_batch(model, transport, guidance, cfg, manifest, y, noise_generator, device)
        images.append(decode_to_uint8(vae, x, cfg.data.image_size))
        if z is not None and offset < grid_count:
            semantic.append(z[: grid_count - offset].float().cpu())
        bar.update(int(y.shape[0]))
    arrays = {"images": np.concatenate(images), "labels": labels.numpy(),
              "count": np.array(count), "format": np.array(SHARD_FORMAT),
              "seconds": np.array(time.perf_counter() - began)}
    if semantic:
        arrays["semantic_grid"] = torch.cat(semantic).numpy()  # (g, C_z, h, w)
    _write_npz(shard_path(folder, index), arrays)


# ---------------------------------------------------------------------------------------------
# Pictures: the sample grid and the semantic channels through PCA (paper Fig. 5)


def image_grid(images: np.ndarray, columns: Optional[int] = None, padding: int = 2) -> np.ndarray:
    """uint8 (n, H, W, 3) -> one uint8 (rows*(H+p)+p, cols*(W+p)+p, 3) picture, row-major."""
    n, h, w, c = images.shape
    columns = columns or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / columns)
    canvas = np.zeros((rows * (h + padding) + padding, columns * (w + padding) + padding, c), np.uint8)
    for i in range(n):
        r, k = divmod(i, columns)
        top, left = padding + r * (h + padding), padding + k * (w + padding)
        canvas[top: top + h, left: left + w] = images[i]
    return canvas


def semantic_pca_rgb(semantic: np.ndarray, image_size: int) -> np.ndarray:
    """Generated semantic channels (n, C_z, h, w) -> uint8 (n, S, S, 3), the paper's Fig. 5 view.

    PCA over all n*h*w generated tokens (float64, centred): the first 3 principal components, each
    min-max normalised to [0, 255] over the set and rounded, nearest-upsampled to S x S. Each
    component's sign is fixed so its largest-magnitude loading is positive (a deterministic
    picture); with C_z < 3 the missing colour channels are 0.
    """
    n, cz, h, w = semantic.shape
    tokens = semantic.astype(np.float64).transpose(0, 2, 3, 1).reshape(-1, cz)  # (n*h*w, C_z)
    centred = tokens - tokens.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)  # rows: principal directions
    k = min(3, cz)
    directions = vt[:k]
    signs = np.sign(directions[np.arange(k), np.abs(directions).argmax(axis=1)])
    directions = directions * np.where(signs == 0, 1.0, signs)[:, None]
    projected = centred @ directions.T  # (n*h*w, k)
    low, high = projected.min(axis=0), projected.max(axis=0)
    span = np.where(high > low, high - low, 1.0)
    scaled = np.rint((projected - low) / span * 255.0)
    rgb = np.zeros((tokens.shape[0], 3))
    rgb[:, :k] = scaled
    rgb = rgb.reshape(n, h, w, 3).astype(np.uint8)
    if image_size % h or image_size % w:
        raise SamplingError(f"image size {image_size} is not a multiple of the semantic grid {h}x{w}")
    return rgb.repeat(image_size // h, axis=1).repeat(image_size // w, axis=2)  # nearest


def _write_png(path: Path, picture: np.ndarray) -> None:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())


def save_sample_grids(folder: Path) -> list[Path]:
    """grid.png (the first images of shard 0) and, for ReDi runs, grid_semantic_pca.png beside it."""
    shard = read_shard(shard_path(folder, 0))
    images = shard["images"][:GRID_SAMPLES]
    written = [folder / "grid.png"]
    _write_png(written[0], image_grid(images))
    if "semantic_grid" in shard:
        pca = semantic_pca_rgb(shard["semantic_grid"], images.shape[1])
        written.append(folder / "grid_semantic_pca.png")
        _write_png(written[1], image_grid(pca))
    return written
