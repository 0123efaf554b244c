"""ADM's evaluator (guided-diffusion `evaluations/evaluator.py`, the one behind the paper's FID, sFID,
IS, precision and recall) written out: which of its reference batches a file is (the batches
themselves are in bench.config, where eval.expected_reference is checked without torch), which
tensor of torch-fidelity's Inception port is its sFID feature, its Inception Score and its k-NN
precision and recall. Where the harness and ADM still differ is listed once, in `bench/evaluate/README.md`, and
recorded in every Inception row of eval.jsonl as `ADM_DIFFERENCES`.
"""

from __future__ import annotations

from typing import Optional, Union

import numpy as np
import torch

from bench.config import REFERENCE_BATCHES

ArrayLike = Union[np.ndarray, torch.Tensor]


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
PR_BLOCK = 10_000  # ManifoldEstimator(row_batch_size=10000, col_batch_size=10000): the fallback's unit

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
    "precision_recall": "same: float16 squared distances, float32 for a 10,000 x 10,000 block with "
                        "an overflow; the float32 summation order of the dot products may differ",
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
    """ADM's `_batch_pairwise_distances` in float32: max(|a|^2 - 2 a.b + |b|^2, 0)."""
    return ((a * a).sum(1)[:, None] - 2.0 * (a @ b.T) + (b * b).sum(1)[None, :]).clamp_min_(0.0)


def _half_squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The same formula on the features cast to float16, as ADM's graph runs it on a GPU: squares
    rounded to float16 and summed in float32 (TF's half reductions accumulate in float), a float16
    matmul with float32 accumulation (cuBLAS' default for half), each elementwise step rounded to
    float16. The float16 products are exact in float32, so only the summation order differs from
    ADM's, which the final rounding to float16 almost always hides."""
    a16, b16 = a.half(), b.half()
    norm_a = (a16 * a16).float().sum(1).half()
    norm_b = (b16 * b16).float().sum(1).half()
    dot = (a16.float() @ b16.float().T).half()
    return ((norm_a[:, None] - 2 * dot) + norm_b[None, :]).clamp_min_(0)


def adm_distances(a: torch.Tensor, b: torch.Tensor, half: bool = True) -> torch.Tensor:
    """ADM's `DistanceBlock.pairwise_distances` of one block (float32 result): the float16
    distances when all of them are finite, else the whole block again in float32 (the tf.cond
    on overflow). half=False: always float32."""
    a, b = a.float(), b.float()
    if half:
        d16 = _half_squared_distances(a, b)
        if bool(torch.isfinite(d16).all()):
            return d16.float()
    return _squared_distances(a, b)


def _blocks(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def manifold_radii(features: torch.Tensor, k: int = PR_NEIGHBOURHOOD, batch: int = PR_BLOCK,
                   half: bool = True) -> torch.Tensor:
    """Squared distance of each point to its k-th nearest neighbour within the set, the point itself
    being the 0-th (ADM's `ManifoldEstimator.manifold_radii`): rows and columns in blocks of
    `batch`, each block's distances as `adm_distances`."""
    if len(features) <= k:
        raise ValueError(f"a k-NN manifold with k={k} needs more than {k} points; got {len(features)}")
    cols = _blocks(len(features), batch)
    return torch.cat([torch.cat([adm_distances(features[rows], features[c], half) for c in cols], 1)
                      .kthvalue(k + 1, dim=1).values for rows in _blocks(len(features), batch)])


def _inside_both(ref: torch.Tensor, ref_radii: torch.Tensor, gen: torch.Tensor, gen_radii: torch.Tensor,
                 batch: int, half: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """ADM's `evaluate_pr`: per block pair, which reference points lie in a sample's hypersphere
    and which samples lie in a reference point's, from one distance block."""
    ref_in = torch.zeros(len(ref), dtype=torch.bool, device=ref.device)
    gen_in = torch.zeros(len(gen), dtype=torch.bool, device=gen.device)
    for i in _blocks(len(ref), batch):
        for j in _blocks(len(gen), batch):
            d = adm_distances(ref[i], gen[j], half)
            ref_in[i] |= (d <= gen_radii[j][None, :]).any(1)
            gen_in[j] |= (d <= ref_radii[i][:, None]).any(0)
    return ref_in, gen_in


def precision_recall(reference: ArrayLike, samples: ArrayLike, k: int = PR_NEIGHBOURHOOD,
                     device: Optional[Union[str, torch.device]] = None, batch: int = PR_BLOCK,
                     half: bool = True) -> tuple[float, float]:
    """ADM's improved precision and recall (Kynkaanniemi et al. 2019), reference = real images,
    samples = generated: precision is the share of samples inside the k-NN manifold of the
    reference features, recall the share of reference features inside the samples' manifold.
    The order of the arguments is ADM's `compute_prec_recall(ref, sample)`; a mode-collapsed
    generator gives precision near 1 and recall near 0 (tests/test_adm.py pins it). Distances as
    ADM computes them: float16 with its float32 fallback per block of `batch` x `batch` (ADM's
    row and column batch, 10,000); half=False computes them all in float32."""
    ref, gen = (_as_tensor(a).to(device or "cpu", torch.float32) for a in (reference, samples))
    if ref.ndim != 2 or gen.ndim != 2 or ref.shape[1] != gen.shape[1]:
        raise ValueError(f"precision_recall needs features (N_ref, D) and (N_samples, D); got "
                         f"{tuple(ref.shape)}, {tuple(gen.shape)}")
    ref_radii, gen_radii = manifold_radii(ref, k, batch, half), manifold_radii(gen, k, batch, half)
    ref_in, gen_in = _inside_both(ref, ref_radii, gen, gen_radii, batch, half)
    return float(gen_in.double().mean()), float(ref_in.double().mean())
