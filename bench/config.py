"""Typed configuration of a redi-bench experiment.

Every setting lives in a dataclass here. Hydra only composes them: the YAML files in `ablations/`
hold deltas, and `bench.compose.load_config` turns the composed DictConfig into these dataclasses with
`OmegaConf.to_object`, so nothing downstream ever sees a DictConfig. `__post_init__` validates, so a
bad value fails when the config loads, with a message that names the key and the allowed values.

Fields whose metadata says `identity=False` do not change results (logging, paths, workers) and are
left out of the run hash (`bench.run_hash`). Defaults follow the paper's Table 8 and section 4 of
the reference where the paper states them; the embedded CPU default is a YAML delta
(`ablations/scale/embedded.yaml`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional

from models.settings import (
    DROP_MODES,
    FLOW_PATHS,
    FUSIONS,
    MODEL_SIZES,
    PATCH_SIZES,
    TRANSPORTS,
    choice_problem,
    p_drop_run_problem,
    split_model_size,
)


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key and what is allowed."""


def _not_identity(default: Any = dataclasses.MISSING, **kwargs: Any) -> Any:
    """A field that does not change results (excluded from the run hash)."""
    if default is dataclasses.MISSING:
        return field(metadata={"identity": False}, **kwargs)
    return field(default=default, metadata={"identity": False}, **kwargs)


def _identity_when_set(default: Any = None) -> Any:
    """A field that enters the run hash only when it is not None: adding it left every existing
    run's hash (and so its folder) unchanged (bench.run_hash.identity_dict)."""
    return field(default=default, metadata={"identity": "when_set"})


def _choice(key: str, value: Any, allowed: tuple) -> None:
    problem = choice_problem(value, allowed)
    if problem:
        raise ConfigError(f"{key}{problem}")


def _range(key: str, value: float, low: float | None = None, high: float | None = None,
           high_open: bool = False) -> None:
    """`value` must be finite and lie in [low, high] ([low, high) with `high_open`)."""
    above = high is not None and (value >= high if high_open else value > high)
    # `nan < low` is False, so NaN (and inf) would slip through the comparisons: reject them first.
    if not math.isfinite(value) or (low is not None and value < low) or above:
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        raise ConfigError(f"{key}={value!r} is out of range; it must be finite and lie in "
                          f"[{lo}, {hi}{')' if high_open else ']'}")


DATASETS = ("fashion_mnist", "digits", "imagefolder")
VAE_KINDS = ("embedded", "diffusers")
ENCODER_KINDS = ("efficientnet_lite0", "dinov2")
PRECISIONS = ("auto", "bf16", "fp32")
LOG_SINKS = ("tensorboard", "wandb")
SAMPLERS = ("sde", "euler", "heun", "ddpm")
GUIDANCE_CHANNELS = ("latent", "all")
LABEL_SAMPLING = ("random", "balanced")
# The timm models behind encoder.variant (bench.prepare.encoders builds them) and eval's FD-DINOv2
# variants (bench.evaluate.features): here, where a config is checked without loading torch.
DINOV2_TIMM_NAMES = {
    "vits14": "vit_small_patch14_dinov2", "vits14_reg": "vit_small_patch14_reg4_dinov2",
    "vitb14": "vit_base_patch14_dinov2", "vitb14_reg": "vit_base_patch14_reg4_dinov2",
    "vitl14": "vit_large_patch14_dinov2", "vitl14_reg": "vit_large_patch14_reg4_dinov2",
}
DINOV2_VARIANTS = tuple(DINOV2_TIMM_NAMES)
FD_DINOV2_TIMM_NAMES = {
    "vits14": "vit_small_patch14_dinov2", "vitb14": "vit_base_patch14_dinov2",
    "vitl14": "vit_large_patch14_dinov2", "vitg14": "vit_giant_patch14_dinov2",
}
FD_DINOV2_VARIANTS = tuple(FD_DINOV2_TIMM_NAMES)
FEATURE_NETWORKS = ("classifier", "inception", "dinov2")


@dataclass(frozen=True)
class ReferenceBatch:
    """A published reference batch, known by its SHA-256 (and its size, a quick first check)."""

    name: str
    filename: str
    sha256: str
    size_bytes: int
    url: str


# ADM's ImageNet 256 reference batch, defined here once so that eval.expected_reference is checked
# without loading torch; bench.evaluate identifies reference files by it.
ADM_IMAGENET256 = ReferenceBatch(
    name="adm-imagenet256",
    filename="VIRTUAL_imagenet256_labeled.npz",
    # The file at `url`. Public repositories that track it with Git LFS store this oid and size, and
    # other evaluation scripts verify their downloads against the same checksum.
    sha256="b32732719497e42660a9affb4a966068cba0855ac449b82015e34ec376d20758",
    size_bytes=2_037_122_530,
    url="https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/256/"
        "VIRTUAL_imagenet256_labeled.npz",
)
REFERENCE_BATCHES = {ADM_IMAGENET256.name: ADM_IMAGENET256}  # the names eval.expected_reference takes

# objective.align_encoder: the start of the encoder_id a prepared folder's manifest records
# (bench.prepare.encoders: efficientnet_lite0_block7_128px, dinov2_vitb14_224px).
ALIGN_ENCODERS = ("efficientnet_lite0", *(f"dinov2_{v}" for v in DINOV2_VARIANTS))


@dataclass
class DataConfig:
    """Which images, and where their prepared tensors live."""

    name: str = "fashion_mnist"
    """fashion_mnist (Debian's dataset-fashion-mnist), digits (scikit-learn, tests) or imagefolder."""
    root: Optional[str] = _not_identity(None)
    """Image folder (imagefolder) or the idx.gz folder (fashion_mnist); None = the standard place."""
    image_size: int = 32
    """Pixels per side after cropping/padding (ADM center crop for imagefolder: 256 or 512)."""
    num_classes: int = 10
    prepared_dir: str = _not_identity("results/prepared")
    """Where `bench prepare` writes shards; the shards' own manifest is what identifies them."""
    align_prepared_dir: Optional[str] = _not_identity(None)
    """A second prepared folder whose stored raw features are the REPA target (None: the target
    comes from prepared_dir, or the encoder online). Same images in the same row order as
    prepared_dir, prepared with encoder.store_features=true; objective.align_encoder names its
    encoder (that name, not this path, is in the run hash)."""

    def __post_init__(self) -> None:
        _choice("data.name", self.name, DATASETS)
        _range("data.image_size", self.image_size, 8)
        _range("data.num_classes", self.num_classes, 1)


@dataclass
class VAEConfig:
    """The latent autoencoder: the embedded tiny AutoencoderKL or a diffusers folder (SD-VAE)."""

    kind: str = "embedded"
    path: Optional[str] = _not_identity(None)
    """A local diffusers folder or a Hugging Face repo id resolved from the local cache only."""
    scaling_factor: float = 0.18215
    """SD-VAE's latent scale; the embedded VAE stores its own (unit-std) factor in its config."""

    def __post_init__(self) -> None:
        _choice("vae.kind", self.kind, VAE_KINDS)
        _range("vae.scaling_factor", self.scaling_factor, 0.0)


@dataclass
class EncoderConfig:
    """The frozen semantic encoder whose PCA-reduced features are the semantic channels."""

    kind: str = "efficientnet_lite0"
    """efficientnet_lite0 (embedded stand-in for DINOv2) or dinov2 (timm, from a local file)."""
    variant: str = "vitb14_reg"
    """For dinov2: vits14, vitb14, vitl14, each with or without `_reg`."""
    weights: Optional[str] = _not_identity(None)
    """Local weights file for dinov2 (nothing is downloaded)."""
    pca_rank_max: int = _not_identity(16)
    """PCA coordinates stored per token by prepare; a run may use any rank up to this. Not in the
    run hash: the first r coordinates do not depend on how many more were stored."""
    store_features: bool = _not_identity(True)
    """Also store the raw (un-PCA'd) patch features, the REPA alignment target (paper App. B.3)."""
    online_features: bool = False
    """Compute the REPA target with the encoder during training instead (the official code's way)."""
    pca_fit_images: Optional[int] = _not_identity(None)
    """Fit the PCA on this many train images (None: all of them). The paper fits on 76,800 randomly
    sampled ImageNet images (the paper scale's default); bench/README.md compares the three fits.
    Like pca_rank_max, a prepare setting: the prepared folder's settings hash covers it (not the run
    hash), and a run refuses to resume on shards prepared with another fit."""
    pca_fit_subset: str = _not_identity("random")
    """random: a subset drawn with the prepare seed (the paper); first: the first N in dataset order."""
    precision: str = _not_identity("auto")
    """What `bench prepare` runs this encoder in: fp32, bf16 (autocast; the features come back in
    fp32 and are stored in float16 as always) or auto (bf16 on a GPU with bf16 and on a CPU with
    AMX-BF16 or AVX512-BF16, where it was measured faster; bench/precision.py). bf16 moves
    EfficientNet-Lite0's block-7 features by about 6% (their PCA coordinates by 3-4.4%;
    results/studies/embedded/precision/feature_error.json). Prepare's other networks stay fp32:
    the VAE (trained and encoded in bf16 it moved the demo's FD by +1.8 for every spec, latent-only
    included; docs/performance.md) and the evaluation classifier (the metric's network). A prepare
    setting: the prepared folder's settings hash covers the resolved value, not the run hash. The
    paper scale pins fp32 (DINOv2 features as the official code extracts them)."""

    def __post_init__(self) -> None:
        _choice("encoder.kind", self.kind, ENCODER_KINDS)
        _choice("encoder.variant", self.variant, DINOV2_VARIANTS)
        _range("encoder.pca_rank_max", self.pca_rank_max, 1)
        _choice("encoder.pca_fit_subset", self.pca_fit_subset, ("random", "first"))
        _choice("encoder.precision", self.precision, PRECISIONS)
        if self.pca_fit_images is not None:
            _range("encoder.pca_fit_images", self.pca_fit_images, 2)


@dataclass
class ModelConfig:
    """The backbone (paper Table 7) and how the two modalities are fused (eq. 7-10)."""

    size: str = "XL/2"
    """Registry name: S, B, L, XL with patch 1, 2, 4, 8 (e.g. B/2), or `custom` with the fields below."""
    hidden_size: int = 0
    depth: int = 0
    num_heads: int = 0
    patch_size: int = 0
    """Used only when size=custom (tiny CPU models)."""
    fusion: str = "merged"
    """none = latent only (SiT/DiT baseline); merged (paper default) or separate tokens."""
    pca_rank: int = 8
    """r, the semantic channels the model sees (paper: 8, Fig. 7)."""
    whiten: bool = False
    """Divide PCA coordinates by the square root of their eigenvalues (the official code does not)."""
    learn_sigma: bool = False
    """Double the output channels for a learned variance (DiT/DDPM); the SiT flow ignores it."""
    class_dropout_prob: float = 0.1
    conditional: bool = True
    """False trains an unconditional model (num_classes = 1, paper Table 3)."""
    grad_checkpointing: bool = _not_identity(False)
    """Recompute activations in the backward pass: less memory, same numbers (not in the run hash)."""

    def __post_init__(self) -> None:
        _choice("model.fusion", self.fusion, FUSIONS)
        _range("model.pca_rank", self.pca_rank, 1)
        # 1 would drop every label: the conditional embedding would never be trained.
        _range("model.class_dropout_prob", self.class_dropout_prob, 0.0, 1.0, high_open=True)
        if self.size != "custom" and split_model_size(self.size) is None:
            raise ConfigError(
                f"model.size={self.size!r} is not allowed; write <size>/<patch> with size in "
                f"{list(MODEL_SIZES)} and patch in {list(PATCH_SIZES)} (e.g. XL/2, "
                "optionally prefixed SiT- or DiT-), or custom with model.hidden_size/depth/"
                "num_heads/patch_size")
        if self.size == "custom":
            for key in ("hidden_size", "depth", "num_heads", "patch_size"):
                if getattr(self, key) <= 0:
                    raise ConfigError(f"model.{key} must be > 0 when model.size=custom")


@dataclass
class ObjectiveConfig:
    """The transport and the terms of the joint loss (eq. 6 / eq. 18, REPA).

    bench.train.build passes these to the core's models.joint_objective.JointObjectiveConfig (the
    fields both transports share). Checked here too, so that a bad value fails at load time with
    the key the user typed and without importing torch; tests/test_joint_objective.py holds the
    two sets of rules equal."""

    transport: str = "flow"
    path: str = "linear"
    lambda_z: float = 1.0
    p_drop: float = 0.0
    """The modality drop's probability (0.2 for Representation Guidance); docs/method.md, "The modality drop"."""
    drop_mode: str = "sample"
    """sample (the paper) or batch_official (the released code); docs/method.md, "The modality drop"."""
    lambda_repa: float = 0.0
    align_layer: int = 8
    projector_hidden: int = 2048
    align_encoder: Optional[str] = _identity_when_set()
    """The encoder of data.align_prepared_dir (set both or neither), e.g. dinov2_vitb14 to align to
    DINOv2-B/14 without registers as REPA published; None aligns to encoder.kind/variant. Checked
    against that folder's manifest; in the run hash only when set."""

    def __post_init__(self) -> None:
        _choice("objective.transport", self.transport, TRANSPORTS)
        _choice("objective.path", self.path, FLOW_PATHS)
        _choice("objective.drop_mode", self.drop_mode, DROP_MODES)
        _range("objective.lambda_z", self.lambda_z, 0.0)
        # Whether the model has semantic channels is ExperimentConfig's check (model.fusion).
        problem = p_drop_run_problem(self.p_drop, has_semantic=True)
        if problem:
            raise ConfigError(f"objective.p_drop{problem}")
        _range("objective.lambda_repa", self.lambda_repa, 0.0)
        _range("objective.align_layer", self.align_layer, 1)
        if self.align_encoder is not None:
            _choice("objective.align_encoder", self.align_encoder, ALIGN_ENCODERS)


@dataclass
class OptimConfig:
    """AdamW, constant learning rate (paper Table 8; official code: no warm-up, no clipping)."""

    lr: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.999
    weight_decay: float = 0.0
    max_grad_norm: float = 0.0
    """0 disables clipping (the official code); peers using fp16/bf16 often use 1.0."""

    def __post_init__(self) -> None:
        _range("optim.lr", self.lr, 0.0)
        _range("optim.beta1", self.beta1, 0.0, 1.0, high_open=True)  # AdamW needs beta < 1
        _range("optim.beta2", self.beta2, 0.0, 1.0, high_open=True)
        _range("optim.weight_decay", self.weight_decay, 0.0)
        _range("optim.max_grad_norm", self.max_grad_norm, 0.0)


@dataclass
class TrainConfig:
    """The loop: batch, length, EMA, precision, checkpoints."""

    batch_size: int = 256
    """Global batch, split over ranks."""
    max_steps: int = 400_000
    ema_decay: float = 0.9999
    precision: str = "auto"
    """auto = bf16 autocast where the device supports it, else fp32 (fp32 master weights always)."""
    seed: int = 0
    compile: Optional[bool] = None
    """torch.compile the network: true, false, or None = auto (both scales' default): compile on a
    CPU when the run is long enough to pay the compile back, falling back to eager with one warning
    if compiling fails; eager on a GPU, as the official code (bench.train.step.resolve_compile). On
    the command line `train.compile=auto` or `null`; in YAML and config.json `null`."""
    ckpt_every: int = _not_identity(50_000)
    keep_last: int = _not_identity(2)
    milestones: list[int] = _not_identity(default_factory=list)
    """Steps whose checkpoints are kept for evaluation (in addition to the last `keep_last`)."""
    log_every: int = _not_identity(100)
    log_to: list[str] = _not_identity(default_factory=list)
    """Where metrics go besides the run folder's JSONL: any of tensorboard, wandb (bench.metrics_log)."""
    num_workers: int = _not_identity(0)

    def __post_init__(self) -> None:
        _range("train.batch_size", self.batch_size, 1)
        _range("train.max_steps", self.max_steps, 1)
        _range("train.ema_decay", self.ema_decay, 0.0, 1.0)
        if self.ema_decay == 1.0:  # ema <- 1.0 * ema + 0 * weights: the EMA stays at initialisation
            raise ConfigError("train.ema_decay=1.0 never moves the EMA: it would stay the initial "
                              "weights however long the run trains; use a decay below 1 (the paper: "
                              "0.9999; short runs: 0.99, so that 1/(1-decay) is well below max_steps)")
        _choice("train.precision", self.precision, PRECISIONS)
        _range("train.ckpt_every", self.ckpt_every, 1)
        _range("train.keep_last", self.keep_last, 1)
        _range("train.log_every", self.log_every, 1)
        for sink in self.log_to:
            _choice("train.log_to", sink, LOG_SINKS)


@dataclass
class GuidanceConfig:
    """Sampling-time guidance (models/GUIDANCE.md): CFG, Representation Guidance, both."""

    cfg_scale: float = 1.0
    cfg_channels: str = "latent"
    interval_low: float = 0.0
    interval_high: float = 1.0
    rg_scale: float = 1.0
    rg_channels: str = "all"

    def __post_init__(self) -> None:
        _range("guidance.cfg_scale", self.cfg_scale, 0.0)
        _range("guidance.rg_scale", self.rg_scale, 0.0)
        _choice("guidance.cfg_channels", self.cfg_channels, GUIDANCE_CHANNELS)
        _choice("guidance.rg_channels", self.rg_channels, GUIDANCE_CHANNELS)
        _range("guidance.interval_low", self.interval_low, 0.0, 1.0)
        _range("guidance.interval_high", self.interval_high, self.interval_low, 1.0)


@dataclass
class EvalConfig:
    """How samples are drawn and scored. Not part of the run hash: it never changes training."""

    sampler: str = "sde"
    num_sampling_steps: int = 250
    num_samples: int = 50_000
    batch_size: int = 64
    label_sampling: str = "random"
    use_ema: bool = True
    seed: int = 0
    precision: str = "fp32"
    """The sampler's network: fp32 (no autocast; RAE's advice when FID is low, and the paper scale's
    default), bf16 autocast, or auto (bf16 on a GPU with bf16 and on a CPU with AMX-BF16, else
    fp32; bench/precision.py). The resolved precision is part of the samples folder's hash and of
    every eval row."""
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    steps: list[int] = field(default_factory=list)
    """Training steps to evaluate; empty = every kept checkpoint."""
    metrics: list[str] = field(default_factory=lambda: ["fid"])
    feature_network: str = "classifier"
    """classifier (embedded Fashion-MNIST net), inception (needs inception_weights) or dinov2."""
    inception_weights: Optional[str] = None
    """Inception-v3 weights file (pt_inception-2015-12-05) for eval.feature_network=inception."""
    dinov2_weights: Optional[str] = None
    """DINOv2 weights file for eval.feature_network=dinov2 (FD-DINOv2, as dgm-eval and EDM2)."""
    dinov2_variant: str = "vitl14"
    """The ViT of dinov2_weights; FD-DINOv2 is conventionally ViT-L/14 (CLS token, D = 1024)."""
    reference: Optional[str] = None
    """Reference statistics or images: an ADM .npz, or None for the prepared test split."""
    expected_reference: Optional[str] = None
    """A published reference batch the numbers must be computed against (adm-imagenet256: ADM's
    VIRTUAL_imagenet256_labeled.npz): eval.reference must then be set, and its SHA-256 is checked."""
    allow_rank_deficient: bool = False
    """Compute FID/sFID/FD from fewer samples than feature dimensions (a rank-deficient covariance,
    a number dominated by estimation error): for miniature runs that test the code path only, such as
    `bench rehearse`'s 2048-dimensional Inception features of a handful of samples. The same as
    `bench eval --allow-rank-deficient`; the rows record `rank_deficient` in their extra."""

    def __post_init__(self) -> None:
        _choice("eval.sampler", self.sampler, SAMPLERS)
        _choice("eval.precision", self.precision, PRECISIONS)
        _choice("eval.label_sampling", self.label_sampling, LABEL_SAMPLING)
        _choice("eval.feature_network", self.feature_network, FEATURE_NETWORKS)
        _choice("eval.dinov2_variant", self.dinov2_variant, FD_DINOV2_VARIANTS)
        if self.expected_reference is not None:
            _choice("eval.expected_reference", self.expected_reference, tuple(REFERENCE_BATCHES))
        _range("eval.num_sampling_steps", self.num_sampling_steps, 1)
        _range("eval.num_samples", self.num_samples, 1)
        _range("eval.batch_size", self.batch_size, 1)


@dataclass
class ExperimentConfig:
    """One training run (and how it is evaluated). `spec` and `grid` name it; the rest defines it."""

    spec: str = "redi"
    grid: str = _not_identity("adhoc")
    data: DataConfig = field(default_factory=DataConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = _not_identity(default_factory=EvalConfig)
    output_root: str = _not_identity("results/runs")

    def __post_init__(self) -> None:
        if not str(self.output_root).strip():  # would silently write ./adhoc/ into the current folder
            raise ConfigError("output_root is empty; give the folder that holds the run folders, "
                              "e.g. output_root=results/runs")
        # Cross-field checks: each names every key involved.
        if self.model.fusion != "none" and self.model.pca_rank > self.encoder.pca_rank_max:
            raise ConfigError(
                f"model.pca_rank={self.model.pca_rank} exceeds encoder.pca_rank_max="
                f"{self.encoder.pca_rank_max}: prepare stores only that many PCA coordinates; "
                "lower model.pca_rank or re-run `bench prepare` with a larger encoder.pca_rank_max")
        if p_drop_run_problem(self.objective.p_drop, self.model.fusion != "none"):
            raise ConfigError("objective.p_drop > 0 needs semantic channels, but model.fusion=none "
                              "(latent only); set model.fusion=merged or objective.p_drop=0")
        if self.model.fusion == "none" and self.eval.guidance.rg_scale != 1.0:
            raise ConfigError("eval.guidance.rg_scale != 1 needs semantic channels, but "
                              "model.fusion=none; Representation Guidance requires a ReDi model")
        self._check_align_encoder()
        if self.objective.transport == "ddpm" and self.eval.sampler != "ddpm":
            raise ConfigError(f"eval.sampler={self.eval.sampler!r} does not fit "
                              "objective.transport=ddpm; use eval.sampler=ddpm")
        if self.objective.transport == "flow" and self.eval.sampler == "ddpm":
            raise ConfigError("eval.sampler=ddpm needs objective.transport=ddpm; the flow "
                              "transport samples with sde, euler or heun")

    def _check_align_encoder(self) -> None:
        """A separate alignment encoder needs both of its keys, an alignment term, stored targets."""
        folder, encoder = self.data.align_prepared_dir, self.objective.align_encoder
        if (folder is None) != (encoder is None):
            given, missing = (("data.align_prepared_dir", "objective.align_encoder") if encoder is None
                              else ("objective.align_encoder", "data.align_prepared_dir"))
            raise ConfigError(f"{given} is set but {missing} is not: a separate alignment encoder needs "
                              "both, the prepared folder of its features (data.align_prepared_dir) and "
                              "its name (objective.align_encoder, e.g. dinov2_vitb14), or neither")
        if encoder is None:
            return
        if self.objective.lambda_repa == 0:
            raise ConfigError(f"objective.align_encoder={encoder} is set but objective.lambda_repa=0 "
                              f"(spec {self.spec}): nothing is aligned; unset objective.align_encoder and "
                              "data.align_prepared_dir for this spec (in a grid: a patch for the REPA specs)")
        if self.encoder.online_features:
            raise ConfigError("encoder.online_features=true computes the REPA target with encoder.kind/"
                              "variant, but objective.align_encoder asks for the stored features of "
                              "data.align_prepared_dir; choose one of the two")

    @property
    def semantic_channels(self) -> int:
        """C_z as the model sees it (0 for latent-only)."""
        return 0 if self.model.fusion == "none" else self.model.pca_rank

    @property
    def num_model_classes(self) -> int:
        """Class count given to the network (1 for unconditional models, paper Table 3)."""
        return self.data.num_classes if self.model.conditional else 1
