"""ADM's evaluator (guided-diffusion `evaluations/evaluator.py`, the one behind the paper's FID, sFID,
IS, precision and recall) written out: its ImageNet 256 reference batch, which tensor of
torch-fidelity's Inception port is its sFID feature, its Inception Score and its k-NN precision and
recall. Where the harness and ADM still differ is listed once, in `bench/evaluate/README.md`, and
recorded in every Inception row of eval.jsonl as `ADM_DIFFERENCES`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch

ArrayLike = Union[np.ndarray, torch.Tensor]


@dataclass(frozen=True)
class ReferenceBatch:
    """A published reference batch, known by its SHA-256 (and its size, a quick first check)."""

    name: str
    filename: str
    sha256: str
    size_bytes: int
    url: str


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

# sFID. ADM reads `mixed_6/conv:0` of the 2015 TF Inception graph and keeps its first 7 channels.
# torch-fidelity's weight converter (utils/util_convert_inception_weights.py) maps that scope's
# `conv2d_params` and `batchnorm` onto `Mixed_6d.branch1x1`, a BasicConv2d (conv, batch norm, ReLU:
# the ops of the TF scope) with a (B, 192, 17, 17) output. ADM flattens the NHWC tensor, so the
# features are ordered (h, w, c); that order is what the reference's precomputed mu_s/sigma_s use.
SPATIAL_TF_TENSOR = "mixed_6/conv:0"
SPATIAL_PORT_MODULE = "Mixed_6d.branch1x1"
SPATIAL_CHANNELS, SPATIAL_SIZE = 7, 17
SPATIAL_DIM = SPATIAL_CHANNELS * SPATIAL_SIZE * SPATIAL_SIZE  # 2,023
IS_SPLIT_SIZE = 5000  # Evaluator.compute_inception_score(split_size=5000)
PR_NEIGHBOURHOOD = 3  # ManifoldEstimator(nhood_sizes=(3,))

ADM_DIFFERENCES = {
    "inception": "torch-fidelity's PyTorch port of the 2015 graph (ADM runs the TF graph itself)",
    "resize": "same: TF1 bilinear to 299 without antialiasing (torch-fidelity reimplements it)",
    "quantisation": "clamp(127.5 x + 128) then truncation, as DiT/SiT/ReDi sample_ddp.py "
                    "(ADM's own image_sample.py floors 127.5 (x + 1))",
    "reference_statistics": "FID/sFID use the reference file's precomputed mu/sigma, mu_s/sigma_s "
                            "(ADM: the same); precision/recall use its images through the port",
    "reference_order": "file order, as ADM (precision/recall do not depend on it)",
    "sample_order": "shard order, as `bench export` writes arr_0 (the IS splits follow it)",
    "inception_score": "float64 softmax (ADM: float32)",
    "precision_recall": "float32 squared distances (ADM: float16 when all are finite, else float32)",
}


def identify_reference(sha256: Optional[str]) -> Optional[str]:
    """Name of the published reference batch with this SHA-256, or None."""
    return next((b.name for b in REFERENCE_BATCHES.values() if b.sha256 == sha256), None)


def spatial_features(mixed_6_conv: torch.Tensor) -> torch.Tensor:
    """ADM's sFID features from the (B, 192, 17, 17) output of `Mixed_6d.branch1x1`: the first 7
    channels, flattened in NHWC order as ADM reshapes the TF tensor: (B, 2023)."""
    if mixed_6_conv.ndim != 4 or tuple(mixed_6_conv.shape[2:]) != (SPATIAL_SIZE, SPATIAL_SIZE):
        raise ValueError(f"expected the (B, 192, 17, 17) map of {SPATIAL_PORT_MODULE}; "
                         f"got {tuple(mixed_6_conv.shape)}")
    return mixed_6_conv[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)


def _as_tensor(array: ArrayLike) -> torch.Tensor:
    return array.detach() if isinstance(array, torch.Tensor) else torch.from_numpy(np.asarray(array))


def inception_score(logits: ArrayLike, split_size: int = IS_SPLIT_SIZE) -> tuple[float, float, int]:
    """ADM's Inception Score, float64: softmax over the logits (pool3 times the softmax weights,
    without bias: torch-fidelity's `logits_unbiased`, 1,008 classes); consecutive splits of
    `split_size` samples in sample order, the last one shorter; per split exp(mean_i KL(p(y|x_i) ||
    mean_j p(y|x_j))); the mean over splits. Returns (mean, std over splits, number of splits).
    torch-fidelity's own IS differs: it shuffles the samples and cuts 10 equal splits."""
    x = _as_tensor(logits).cpu().double()
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"inception_score needs logits (N, K) with N > 0; got {tuple(x.shape)}")
    if split_size < 1:
        raise ValueError(f"split_size must be >= 1; got {split_size}")
    log_p = torch.log_softmax(x, dim=1)
    scores = []
    for start in range(0, len(x), split_size):
        part = log_p[start: start + split_size]
        log_marginal = torch.logsumexp(part, dim=0) - np.log(len(part))  # log of mean_j p(y|x_j)
        kl = (part.exp() * (part - log_marginal)).sum(dim=1).mean()
        scores.append(float(kl.exp()))
    return float(np.mean(scores)), float(np.std(scores)), len(scores)


def _squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """ADM's `_batch_pairwise_distances`: max(|a|^2 - 2 a.b + |b|^2, 0)."""
    return ((a * a).sum(1)[:, None] - 2.0 * (a @ b.T) + (b * b).sum(1)[None, :]).clamp_min_(0.0)


def manifold_radii(features: torch.Tensor, k: int = PR_NEIGHBOURHOOD, batch: int = 2048) -> torch.Tensor:
    """Squared distance of each point to its k-th nearest neighbour within the set, the point itself
    being the 0-th (ADM's `ManifoldEstimator.manifold_radii`)."""
    if len(features) <= k:
        raise ValueError(f"a k-NN manifold with k={k} needs more than {k} points; got {len(features)}")
    return torch.cat([_squared_distances(features[i: i + batch], features).kthvalue(k + 1, dim=1).values
                      for i in range(0, len(features), batch)])


def _inside(queries: torch.Tensor, points: torch.Tensor, radii: torch.Tensor, batch: int) -> torch.Tensor:
    """Whether each query lies in the hypersphere of at least one point."""
    return torch.cat([(_squared_distances(queries[i: i + batch], points) <= radii[None, :]).any(1)
                      for i in range(0, len(queries), batch)])


def precision_recall(reference: ArrayLike, samples: ArrayLike, k: int = PR_NEIGHBOURHOOD,
                     device: Optional[Union[str, torch.device]] = None, batch: int = 2048
                     ) -> tuple[float, float]:
    """ADM's improved precision and recall (Kynkaanniemi et al. 2019), reference = real images,
    samples = generated: precision is the share of samples inside the k-NN manifold of the
    reference features, recall the share of reference features inside the samples' manifold.
    The order of the arguments is ADM's `compute_prec_recall(ref, sample)`; a mode-collapsed
    generator gives precision near 1 and recall near 0 (tests/test_adm.py pins it)."""
    ref, gen = (_as_tensor(a).to(device or "cpu", torch.float32) for a in (reference, samples))
    if ref.ndim != 2 or gen.ndim != 2 or ref.shape[1] != gen.shape[1]:
        raise ValueError(f"precision_recall needs features (N_ref, D) and (N_samples, D); got "
                         f"{tuple(ref.shape)}, {tuple(gen.shape)}")
    ref_radii, gen_radii = manifold_radii(ref, k, batch), manifold_radii(gen, k, batch)
    precision = _inside(gen, ref, ref_radii, batch).double().mean()
    recall = _inside(ref, gen, gen_radii, batch).double().mean()
    return float(precision), float(recall)
