"""Feature networks for the Frechet distance, KID, precision/recall and IS, and reference statistics.

Three networks, all taking uint8 RGB images `(B, 3, H, W)` and returning float32 features `(B, D)`:

- `classifier`: the embedded default's independent Fashion-MNIST CNN (`bench.prepare.embedded`), penultimate
  features (D = its feature_dim) and class logits (for the conditional accuracy);
- `inception`: torch-fidelity's `inception-v3-compat` (the TF FID Inception) built from a
  user-supplied weights file (`eval.inception_weights`; torch-fidelity itself would download). One
  pass gives all of ADM's tensors: pool3 (D = 2048), the sFID map (`bench.evaluate.adm`, D = 2023)
  and the logits without bias that ADM's IS uses (1008 classes);
- `dinov2`: FD-DINOv2 as EDM2 / dgm-eval compute it: bicubic antialiased resize to 224 on the 0..255
  scale, /255, ImageNet mean/std, ViT-L/14 final-norm CLS token (D = 1024), timm from a local file.

Nothing is downloaded. Each network carries `network_id` and `weights_sha256`; both go into the
cache key of `reference_statistics` (statistics of an ADM-style reference `.npz` or of images in
memory, cached by content hash) and into every eval.jsonl row.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from bench.atomic import atomic_write_bytes, sha256_file
from bench.config import FD_DINOV2_TIMM_NAMES as DINOV2_TIMM_NAMES
from bench.evaluate import adm
from bench.evaluate.quality import FeatureStatistics, MetricError, as_float64, check_sample_count, package_version
from bench.prepare.embedded import load_classifier
from bench.progress import Progress

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DINOV2_INPUT_SIZE = 224
REFERENCE_IMAGES_KEY = "arr_0"
REFERENCE_STAT_KEYS = ("mu", "sigma")
CACHE_FORMAT = "redi-bench-refstats/1"

ImagesLike = Union[np.ndarray, torch.Tensor]


class FeatureNetworkError(ValueError):
    """A feature network cannot be built (missing or unsafe weights file, bad variant)."""


def as_uint8_nchw(images: ImagesLike) -> torch.Tensor:
    """uint8 images as a torch `(N, 3, H, W)` tensor; accepts `(N, H, W, 3)` (ADM .npz layout) too.

    Floats are refused: quantise exactly once with `bench.evaluate.quality.to_uint8` first.
    """
    tensor = torch.as_tensor(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) \
        else images
    if tensor.dtype != torch.uint8:
        raise MetricError(f"feature networks take uint8 images; got dtype {tensor.dtype}. Quantise "
                         "samples once with bench.evaluate.quality.to_uint8 (DiT/SiT rounding)")
    if tensor.ndim != 4 or 3 not in (tensor.shape[1], tensor.shape[3]):
        raise MetricError(f"images must be (N, 3, H, W) or (N, H, W, 3); got {tuple(tensor.shape)}")
    if tensor.shape[1] == 3 and tensor.shape[3] == 3:
        raise MetricError(f"images of shape {tuple(tensor.shape)} are ambiguous (3x3 pixels?); "
                         "pass (N, 3, H, W) with H, W != 3")
    return tensor if tensor.shape[1] == 3 else tensor.permute(0, 3, 1, 2)


def state_dict_sha256(module: nn.Module) -> str:
    """sha256 over a module's state dict (names, dtypes, shapes and bytes, in sorted order)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


class FeatureNetwork(nn.Module):
    """A frozen network mapping uint8 `(B, 3, H, W)` to float32 features `(B, feature_dim)`."""

    network_id: str
    weights_sha256: str
    feature_dim: int
    preprocessing: str = ""

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def extract(self, images: ImagesLike) -> torch.Tensor:
        """uint8 images -> float32 features `(B, feature_dim)` on the network's device."""
        # Contiguous NCHW: convolution kernels (and so float32 rounding) depend on memory layout,
        # and NHWC input from an .npz must give bit-identical features to NCHW input.
        x = as_uint8_nchw(images).to(self._device()).contiguous()
        return self.forward_features(x).float()

    @property
    def has_logits(self) -> bool:
        return False

    @torch.no_grad()
    def logits(self, images: ImagesLike) -> torch.Tensor:
        """Class logits `(B, K)`; only the classifier and Inception have them."""
        raise FeatureNetworkError(f"feature network {self.network_id} has no class logits; the "
                                  "IS and the conditional accuracy need eval.feature_network="
                                  "classifier (IS: or inception)")

    @torch.no_grad()
    def outputs(self, images: ImagesLike, logits: bool = False) -> dict[str, torch.Tensor]:
        """`features` (and `logits` when asked) of a batch; Inception adds `spatial` from the same pass."""
        out = {"features": self.extract(images)}
        if logits:
            out["logits"] = self.logits(images).float()
        return out

    def describe(self) -> dict:
        """Provenance: id, weights hash, feature dimension, preprocessing."""
        return {"feature_network": self.network_id, "feature_weights_sha256": self.weights_sha256,
                "feature_dim": self.feature_dim, "preprocessing": self.preprocessing}

    def _device(self) -> torch.device:
        first = next(self.parameters(), None)
        return first.device if first is not None else torch.device("cpu")

    @property
    def device(self) -> torch.device:
        """Where the network runs (CPU for a network without parameters)."""
        return self._device()


class ModuleFeatures(FeatureNetwork):
    """Wraps any module with `.features(images) -> (B, D)` (and optionally `.logits(images)`)."""

    def __init__(self, module: nn.Module, network_id: str, weights_sha256: Optional[str] = None,
                 preprocessing: str = "", feature_dim: Optional[int] = None) -> None:
        """`weights_sha256` defaults to a hash of the state dict; `feature_dim` to the width of
        the features of one black 32x32 image."""
        super().__init__()
        if not callable(getattr(module, "features", None)):
            raise FeatureNetworkError(f"{type(module).__name__} has no .features(images) method")
        self.module = module.eval().requires_grad_(False)
        self.network_id = network_id
        self.weights_sha256 = weights_sha256 or state_dict_sha256(module)
        self.preprocessing = preprocessing or "the module's own (uint8 in)"
        if feature_dim is None:
            feature_dim = int(self.extract(torch.zeros(1, 3, 32, 32, dtype=torch.uint8)).shape[1])
        self.feature_dim = int(feature_dim)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.module.features(images).flatten(1)

    @property
    def has_logits(self) -> bool:
        return callable(getattr(self.module, "logits", None))

    @torch.no_grad()
    def logits(self, images: ImagesLike) -> torch.Tensor:
        if not self.has_logits:
            return super().logits(images)
        return self.module.logits(as_uint8_nchw(images).to(self._device()).contiguous()).float()


def load_classifier_network(directory: Union[str, Path]) -> ModuleFeatures:
    """The embedded evaluation classifier saved by `bench prepare` (model.safetensors +
    classifier.json in `directory`) as a feature network."""

    model = load_classifier(directory)  # raises FileNotFoundError with the fix when absent
    dim = model.config["feature_dim"]
    return ModuleFeatures(model, network_id=f"{_classifier_data(directory)}-classifier-d{dim}",
                          weights_sha256=sha256_file(Path(directory) / "model.safetensors"),
                          preprocessing="uint8 RGB 32x32 -> x/127.5-1; penultimate ReLU features")


def _classifier_data(directory: Union[str, Path]) -> str:
    """What the classifier was trained on, from its prepare's manifest.json: `fmnist` (the name
    eval rows have always carried) for Fashion-MNIST, else the dataset's name (digits, ...)."""
    manifest = Path(directory).parent / "manifest.json"
    try:
        name = json.loads(manifest.read_text())["data"]["name"]
    except (OSError, ValueError, KeyError, TypeError):
        return "fmnist"  # a classifier folder without its prepare: the embedded default's
    return "fmnist" if name == "fashion_mnist" else str(name)


def _require_file(path: Optional[Union[str, Path]], key: str, what: str) -> Path:
    if path is None or not Path(path).is_file():
        shown = "not set" if path is None else f"{path} does not exist"
        raise FeatureNetworkError(f"{key} is {shown}: {what} needs a local weights file "
                                  f"(nothing is downloaded); point {key} at it")
    return Path(path)


class InceptionFeatures(FeatureNetwork):
    """torch-fidelity's `inception-v3-compat` from a local weights file: pool3 features (D = 2048)
    for FID, KID and precision/recall; from the same pass ADM's sFID features (`spatial`, the first
    7 channels of `Mixed_6d.branch1x1` = the graph's `mixed_6/conv`, D = 2023) and the logits
    without bias of ADM's IS (`logits_unbiased`, 1008 classes).

    torch-fidelity resizes with its TF1-exact bilinear resize to 299 and maps x -> (x - 128) / 128.
    Its own loader unpickles the file (`weights_only=False`); here the file is first read with
    `torch.load(weights_only=True)` (tensors only, so an untrusted file cannot run code) and
    torch-fidelity gets an in-memory re-serialisation of that plain state dict.
    """

    def __init__(self, weights_path: Optional[Union[str, Path]],
                 key: str = "eval.inception_weights") -> None:
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        path = _require_file(weights_path, key, "the Inception-v3 FID network")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - report any unsafe/corrupt file the same way
            raise FeatureNetworkError(f"{key}={path} is not a plain tensor state dict loadable "
                                      f"with weights_only=True ({error})") from error
        buffer = io.BytesIO()
        torch.save(state, buffer)
        buffer.seek(0)
        self.model = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                                 feature_extractor_weights_path=buffer)
        self.model.eval()
        self._spatial: list[torch.Tensor] = []
        spatial_module = self.model.get_submodule(adm.SPATIAL_PORT_MODULE)
        spatial_module.register_forward_hook(lambda module, args, out: self._spatial.append(out))
        self.network_id = "inception-v3-compat-pool3"
        self.weights_sha256 = sha256_file(path)
        self.feature_dim = 2048
        self.preprocessing = "torch-fidelity: TF1 bilinear resize to 299, (x-128)/128"
        self.implementation = f"torch-fidelity {package_version('torch-fidelity')}"
        self.spatial = InceptionSpatial(self)

    @property
    def has_logits(self) -> bool:
        return True

    def _forward_all(self, images: ImagesLike) -> dict[str, torch.Tensor]:
        x = as_uint8_nchw(images).to(self._device()).contiguous()
        self._spatial.clear()
        pool, logits = self.model(x)
        (spatial,) = self._spatial  # the hook saw Mixed_6d.branch1x1 once
        self._spatial.clear()
        return {"features": pool.float(), "spatial": adm.spatial_features(spatial).float(),
                "logits": logits.float()}

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        return self._forward_all(images)["features"]

    @torch.no_grad()
    def logits(self, images: ImagesLike) -> torch.Tensor:
        return self._forward_all(images)["logits"]

    @torch.no_grad()
    def outputs(self, images: ImagesLike, logits: bool = False) -> dict[str, torch.Tensor]:
        return self._forward_all(images)


class InceptionSpatial(FeatureNetwork):
    """ADM's sFID features of an `InceptionFeatures` (D = 2023) as a feature network of their own
    (own id, so reference statistics are cached and read from `mu_s`/`sigma_s` separately)."""

    def __init__(self, inception: InceptionFeatures) -> None:
        super().__init__()
        self._inception = [inception]  # a list: not a submodule, so no parameters are shared twice
        self.network_id = "inception-v3-compat-mixed6conv7"
        self.weights_sha256 = inception.weights_sha256
        self.feature_dim = adm.SPATIAL_DIM
        self.preprocessing = inception.preprocessing

    def _device(self) -> torch.device:
        return self._inception[0]._device()

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        return self._inception[0]._forward_all(images)["spatial"]


PRECOMPUTED_KEYS = {"inception-v3-compat-pool3": ("mu", "sigma"),
                    "inception-v3-compat-mixed6conv7": ("mu_s", "sigma_s")}
"""Networks whose statistics an ADM reference batch holds precomputed (TF graph), and the keys."""


class DinoV2Features(FeatureNetwork):
    """FD-DINOv2 features (EDM2's `torch` resize mode, modelled on dgm-eval): the CLS token after
    the final norm of a DINOv2 ViT (dgm-eval and EDM2 use ViT-L/14, D = 1024)."""

    def __init__(self, weights_path: Optional[Union[str, Path]], variant: str = "vitl14",
                 key: str = "the DINOv2 weights path", **model_overrides) -> None:
        """`model_overrides` (embed_dim, depth, num_heads) exist for tests with tiny ViTs."""
        super().__init__()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # any hub access fails fast, never retries
        import timm

        if variant not in DINOV2_TIMM_NAMES:
            raise FeatureNetworkError(f"DINOv2 variant {variant!r} is unknown; choose one of "
                                      f"{sorted(DINOV2_TIMM_NAMES)}")
        path = _require_file(weights_path, key, "FD-DINOv2")
        # pretrained=True from a file: timm's filter converts the official Meta layout and
        # resamples the position embedding to 224 px; timm reads .pth with weights_only=True.
        self.model = timm.create_model(
            DINOV2_TIMM_NAMES[variant], pretrained=True, img_size=DINOV2_INPUT_SIZE, num_classes=0,
            pretrained_cfg_overlay=dict(file=str(path)), **model_overrides)
        self.model.eval().requires_grad_(False)
        self.network_id = f"dinov2-{variant}-cls{'-custom' if model_overrides else ''}"
        self.weights_sha256 = sha256_file(path)
        self.feature_dim = int(self.model.num_features)
        self.preprocessing = ("float 0..255, bicubic antialiased resize to 224, /255, ImageNet "
                              "mean/std; final-norm CLS token (EDM2 resize_mode=torch)")
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 `(B, 3, H, W)` -> normalised float `(B, 3, 224, 224)`."""
        x = F.interpolate(images.float(), size=(DINOV2_INPUT_SIZE, DINOV2_INPUT_SIZE),
                          mode="bicubic", antialias=True, align_corners=False)
        return (x / 255.0 - self.mean) / self.std

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        # num_classes=0 and global_pool="token": forward() = the final-norm CLS token, (B, D).
        return self.model(self.preprocess(images))


def build_feature_network(kind: str, *, classifier_dir: Optional[Union[str, Path]] = None,
                          inception_weights: Optional[Union[str, Path]] = None,
                          dinov2_weights: Optional[Union[str, Path]] = None,
                          dinov2_variant: str = "vitl14") -> FeatureNetwork:
    """The network named by `eval.feature_network` (classifier, inception or dinov2)."""
    if kind == "classifier":
        if classifier_dir is None:
            raise FeatureNetworkError("eval.feature_network=classifier needs the embedded "
                                      "classifier folder; run `bench prepare` first")
        return load_classifier_network(classifier_dir)
    if kind == "inception":
        return InceptionFeatures(inception_weights)
    if kind == "dinov2":
        return DinoV2Features(dinov2_weights, dinov2_variant, key="eval.dinov2_weights")
    raise FeatureNetworkError(f"eval.feature_network={kind!r} is unknown; choose one of "
                              "['classifier', 'inception', 'dinov2']")


@contextlib.contextmanager
def tf32_off():
    """TF32 off for CUDA matmuls and cuDNN convolutions while evaluation features are computed,
    restored afterwards (also on error). ADM's reference statistics come from its float32 TF graph,
    while PyTorch lets cuDNN convolutions use TF32 (a 10-bit mantissa) by default on Ampere and
    newer GPUs; the training loop turns both on for the official recipe. A context decorator:
    `compute_metrics` and `reference_statistics` run inside it."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul
        torch.backends.cudnn.allow_tf32 = cudnn


@torch.no_grad()
def extract_features(network: FeatureNetwork, images: ImagesLike, batch_size: int = 256,
                     progress: bool = False, label: str = "features") -> np.ndarray:
    """Features of all `images` (uint8, NCHW or NHWC) as float64 numpy `(N, D)`, in batches;
    `progress` reports them as `eval <label>: images n/N ...` (bench.progress)."""
    out = []
    with Progress(f"eval {label}: images", len(images), enabled=progress) as bar:
        for start in range(0, len(images), batch_size):
            out.append(network.extract(images[start: start + batch_size]).cpu().double().numpy())
            bar.update(len(out[-1]))
    return np.concatenate(out) if out else np.zeros((0, network.feature_dim))


# ---------------------------------------------------------------------------------------------
# Reference statistics


def _reference_keys_error(path: Path, keys: list[str]) -> MetricError:
    return MetricError(
        f"reference {path} has keys {sorted(keys)}; expected '{REFERENCE_IMAGES_KEY}' "
        f"(N, H, W, 3 uint8 images, ADM reference batch) and/or both 'mu' and 'sigma' "
        "(precomputed statistics; 'mu_s'/'sigma_s' for sFID are optional)")


def _open_npz(path: Path):
    data = np.load(path, allow_pickle=False)  # never unpickle a reference file
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise MetricError(f"reference {path} is not an .npz archive (ADM reference batch layout: "
                          f"'{REFERENCE_IMAGES_KEY}' images and/or 'mu' + 'sigma')")
    return data


def _npz_member_shape(npz, key: str) -> tuple[int, ...]:
    """Shape of member `key` from its .npy header alone (an ADM batch's `arr_0` can be gigabytes)."""
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    with npz.zip.open(f"{key}.npy") as handle:
        reader = readers.get(np.lib.format.read_magic(handle))
        if reader is not None:
            return tuple(int(v) for v in reader(handle)[0])
    return tuple(npz[key].shape)  # another header version: read the member


def _images_sha256(images: torch.Tensor) -> str:
    digest = hashlib.sha256(f"uint8|{tuple(images.shape)}|".encode())
    digest.update(images.contiguous().numpy().tobytes())
    return digest.hexdigest()


def _check_image_size(hw: tuple[int, int], image_size, source: str) -> None:
    if image_size is None:
        return
    want = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if tuple(hw) != want:
        raise MetricError(f"reference images from {source} are {hw[0]}x{hw[1]} but the samples "
                          f"are {want[0]}x{want[1]}; use a reference at the samples' resolution "
                          "(same crop, e.g. ADM center crop) or resize it once, explicitly")


def _precomputed_statistics(path: Path, reference_sha: str, feature_network: FeatureNetwork, image_size,
                            use_precomputed: bool) -> Optional[tuple[np.ndarray, np.ndarray, dict[str, Any]]]:
    """`(mu, sigma, provenance)` from a `.npz`'s precomputed statistics when they belong to this
    network and `use_precomputed`; None when its `arr_0` images must be used instead."""
    network_id, source = feature_network.network_id, str(path)
    stat_keys = PRECOMPUTED_KEYS.get(network_id)
    with _open_npz(path) as npz:  # lazy: arr_0 is not read here
        keys = list(npz.files)
        has_images = REFERENCE_IMAGES_KEY in keys
        if not has_images and not all(k in keys for k in REFERENCE_STAT_KEYS):
            raise _reference_keys_error(path, keys)
        use_stats = (use_precomputed and stat_keys is not None
                     and all(k in keys for k in stat_keys))
        if use_stats:
            mu, sigma = as_float64(npz[stat_keys[0]]), as_float64(npz[stat_keys[1]])
            # ADM batches hold the images beside their statistics: a reference of another
            # resolution is refused here too (a mu/sigma-only file cannot be checked).
            shape = _npz_member_shape(npz, REFERENCE_IMAGES_KEY) if has_images else None
    if not use_stats:
        if not has_images:
            wanted = f"'{stat_keys[0]}'/'{stat_keys[1]}' or " if stat_keys else ""
            raise MetricError(f"reference {path} holds only precomputed statistics ({sorted(keys)}), "
                              f"none of them for {network_id}, which needs {wanted}reference images "
                              f"under '{REFERENCE_IMAGES_KEY}'")
        return None
    if shape is not None:
        if len(shape) != 4 or shape[-1] != 3:
            raise MetricError(f"reference {source}: '{REFERENCE_IMAGES_KEY}' must be uint8 "
                              f"(N, H, W, 3); got shape {shape}")
        _check_image_size(shape[1:3], image_size, source)
    if mu.shape != (feature_network.feature_dim,):
        raise MetricError(f"reference {path}: precomputed '{stat_keys[0]}' has shape "
                          f"{mu.shape} but {network_id} gives {feature_network.feature_dim} "
                          "features; pass use_precomputed=False to use its images instead")
    return mu, sigma, {"reference_source": source, "reference_sha256": reference_sha,
                       "statistics_source": f"precomputed {'/'.join(stat_keys)} in the npz",
                       "n_reference": None, "cache_hit": False, "cache_file": None,
                       "image_hw": tuple(shape[1:3]) if shape is not None else None}


def _npz_images(path: Path) -> torch.Tensor:
    """The uint8 NCHW images under `arr_0` of a reference `.npz`."""
    with _open_npz(path) as npz:
        array = npz[REFERENCE_IMAGES_KEY]
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] != 3:
        raise MetricError(f"reference {path}: '{REFERENCE_IMAGES_KEY}' must be uint8 "
                          f"(N, H, W, 3); got {array.dtype} {array.shape}")
    return as_uint8_nchw(array)


def _image_statistics(images: torch.Tensor, feature_network: FeatureNetwork, batch_size: int,
                      allow_rank_deficient: bool, progress: bool) -> tuple[np.ndarray, np.ndarray, int]:
    """`(mu, sigma, count)` of the network's features of `images`, streamed batch by batch."""
    stats = FeatureStatistics(feature_network.feature_dim)
    with Progress(f"eval reference {feature_network.network_id}: images", len(images), enabled=progress) as bar:
        for start in range(0, len(images), batch_size):
            batch = images[start: start + batch_size]
            stats.update(feature_network.extract(batch))
            bar.update(len(batch))
    mu, sigma = stats.finalize(allow_rank_deficient)
    return mu, sigma, stats.count


@tf32_off()
def reference_statistics(reference: Union[str, Path, ImagesLike], feature_network: FeatureNetwork,
                         cache_dir: Union[str, Path], image_size=None, batch_size: int = 256,
                         allow_rank_deficient: bool = False, use_precomputed: bool = True,
                         reference_sha256: Optional[str] = None, progress: bool = False,
                         ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """`(mu, sigma, provenance)` of a reference: an ADM-style `.npz` or uint8 images in memory.

    A `.npz`'s precomputed statistics are used as is only for the Inception networks they belong
    to (`PRECOMPUTED_KEYS`: ADM's `mu`/`sigma` are TF-Inception pool3, `mu_s`/`sigma_s` its sFID
    map) when `use_precomputed`; otherwise the features of its `arr_0` images are computed once and
    cached in `cache_dir` under a name holding the reference sha256 and the network id + weights
    sha256. `image_size` (int or (H, W)) is the samples' size; a reference of another size is
    refused. `reference_sha256`, when the caller has hashed the file already, saves hashing again.
    `progress` reports the feature pass over the reference images (bench.progress).
    """
    network_id, weights_sha = feature_network.network_id, feature_network.weights_sha256
    images = None
    if isinstance(reference, (str, Path)):
        path = Path(reference)
        if not path.is_file():
            raise MetricError(f"reference file {path} does not exist (eval.reference)")
        reference_sha, source = reference_sha256 or sha256_file(path), str(path)
        precomputed = _precomputed_statistics(path, reference_sha, feature_network, image_size, use_precomputed)
        if precomputed is not None:
            return precomputed
    else:
        images = as_uint8_nchw(reference).cpu()
        reference_sha, source = _images_sha256(images), "in-memory images"

    cache_file = Path(cache_dir) / f"refstats-{network_id}-w{weights_sha}-r{reference_sha}.npz"
    provenance = {"reference_source": source, "reference_sha256": reference_sha,
                  "statistics_source": "features of the reference images",
                  "cache_file": str(cache_file)}
    cached = _read_cache(cache_file, reference_sha, network_id, weights_sha)
    if cached is not None:
        mu, sigma, count, hw = cached
        _check_image_size(hw, image_size, source)
        check_sample_count(count, len(mu), allow_rank_deficient, f"reference {source}")
        return mu, sigma, {**provenance, "n_reference": count, "image_hw": hw, "cache_hit": True}

    if images is None:
        images = _npz_images(path)
    hw = (int(images.shape[2]), int(images.shape[3]))
    _check_image_size(hw, image_size, source)
    mu, sigma, count = _image_statistics(images, feature_network, batch_size, allow_rank_deficient, progress)
    _write_cache(cache_file, mu, sigma, count, hw, reference_sha, network_id, weights_sha)
    return mu, sigma, {**provenance, "n_reference": count, "image_hw": hw, "cache_hit": False}


def _write_cache(path: Path, mu, sigma, count, hw, reference_sha, network_id, weights_sha) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, mu=mu, sigma=sigma, count=np.array(count), image_hw=np.array(hw),
             format=np.array(CACHE_FORMAT), reference_sha256=np.array(reference_sha),
             network_id=np.array(network_id), weights_sha256=np.array(weights_sha))
    atomic_write_bytes(path, buffer.getvalue())


def _read_cache(path: Path, reference_sha, network_id, weights_sha):
    """`(mu, sigma, count, (H, W))` when `path` holds statistics for exactly these inputs."""
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as data:
        expected = {"format": CACHE_FORMAT, "reference_sha256": reference_sha,
                    "network_id": network_id, "weights_sha256": weights_sha}
        if any(key not in data.files or str(data[key]) != value for key, value in expected.items()):
            return None  # a foreign or older file under this name: recompute and overwrite
        hw = tuple(int(v) for v in data["image_hw"])
        return as_float64(data["mu"]), as_float64(data["sigma"]), int(data["count"]), hw
