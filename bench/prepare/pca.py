"""PCA of the semantic encoder's patch tokens (paper §3.4), fitted by streaming float64 sums.

The official pipeline (ReDi `calc_pca.py` + `train_redi.py`) is
    z = (z - mean) / std                 per-dimension standardisation
    z = z - pca_mean                     the mean of the standardised features (~0, kept exact)
    z_pca = z @ components[:r].T         no whitening
and so is `PCAModel.project(..., whiten=False)`.

One pass over the data suffices: `PCAStats` accumulates the token count n, the sum s and the sum of
outer products Q (all float64). With the raw covariance C = (Q - n m m^T) / (n - 1), m = s / n, the
standardised features y = D^-1 (x - m), D = diag(std), have covariance D^-1 C D^-1, so the basis
comes from one eigendecomposition without a second pass. Sums from shards and array tasks add up
(`merge`), so the result does not depend on how the data was split.

Degrees of freedom, chosen to match the official file: `std` is the population standard deviation
(ddof 0, numpy's `np.std` as in `calc_pca.py`) and the covariance/eigenvalues use n - 1 (sklearn's
PCA `explained_variance_`). With millions of tokens the two differ by a factor 1 + 1/n.
Dimensions with zero variance get std 1 (as sklearn's StandardScaler), so they stay finite.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from bench.atomic import atomic_save_safetensors, atomic_write_json

PCA_FORMAT = "redi-bench-pca/1"


class PCAError(ValueError):
    """A PCA file is missing, malformed, untrusted, or does not match the encoder."""


class PCAStats:
    """Mergeable float64 sums over feature vectors: count, sum, sum of outer products."""

    def __init__(self, dim: int) -> None:
        self.dim = int(dim)
        self.count = 0
        self.sum = torch.zeros(dim, dtype=torch.float64)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64)

    def update(self, features: torch.Tensor) -> "PCAStats":
        """Add tokens `(N, D)` (any float dtype; accumulated in float64)."""
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise PCAError(f"PCAStats(dim={self.dim}) got features of shape {tuple(features.shape)}")
        x = features.detach().to(torch.float64)
        self.count += int(x.shape[0])
        self.sum += x.sum(dim=0)
        self.outer += x.T @ x
        return self

    def merge(self, other: "PCAStats") -> "PCAStats":
        """Add another accumulator's sums into this one (in place; returns self)."""
        if other.dim != self.dim:
            raise PCAError(f"cannot merge PCA sums of dimension {other.dim} into {self.dim}")
        self.count += other.count
        self.sum += other.sum
        self.outer += other.outer
        return self

    def to_tensors(self, prefix: str = "pca_") -> dict[str, torch.Tensor]:
        """The sums as tensors (for a shard or a stats file)."""
        return {f"{prefix}count": torch.tensor([self.count], dtype=torch.int64),
                f"{prefix}sum": self.sum.clone(), f"{prefix}outer": self.outer.clone()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str = "pca_") -> "PCAStats":
        """Inverse of `to_tensors`."""
        stats = cls(int(tensors[f"{prefix}sum"].shape[0]))
        stats.count = int(tensors[f"{prefix}count"][0])
        stats.sum = tensors[f"{prefix}sum"].to(torch.float64).clone()
        stats.outer = tensors[f"{prefix}outer"].to(torch.float64).clone()
        return stats

    def finalize(self, encoder_id: str, num_images: int = 0) -> "PCAModel":
        """Standardise, eigendecompose the standardised covariance, and return the full basis."""
        if self.count < 2:
            raise PCAError(f"PCA needs at least 2 tokens, got {self.count}")
        n = float(self.count)
        mean = self.sum / n
        centred = self.outer - n * torch.outer(mean, mean)  # sum of (x - m)(x - m)^T
        centred = 0.5 * (centred + centred.T)  # exact symmetry for eigh
        variance = centred.diagonal().clamp_min(0.0) / n  # population variance (ddof 0)
        std = variance.sqrt()
        std = torch.where(std > 0, std, torch.ones_like(std))
        cov_std = centred / (n - 1.0) / torch.outer(std, std)  # D^-1 C D^-1, C with ddof 1
        eigenvalues, vectors = torch.linalg.eigh(cov_std)
        order = torch.argsort(eigenvalues, descending=True)
        eigenvalues = eigenvalues[order].clamp_min(0.0)
        components = vectors[:, order].T.contiguous()  # rows are components (sklearn layout)
        components = _flip_signs(components)
        # The mean of the standardised features: (m - m)/std, exactly 0 here, but kept as a stored
        # quantity because an imported official file has a non-zero one.
        pca_mean = (self.sum / n - mean) / std
        return PCAModel(mean=mean, std=std, pca_mean=pca_mean, components=components,
                        eigenvalues=eigenvalues, count=self.count, num_images=int(num_images),
                        encoder_id=encoder_id, source="streaming-float64")


def _flip_signs(components: torch.Tensor) -> torch.Tensor:
    """Make each component's largest-magnitude entry positive (sklearn's svd_flip on rows), so the
    basis is deterministic across runs and splits."""
    index = components.abs().argmax(dim=1)
    signs = torch.sign(components[torch.arange(components.shape[0]), index])
    signs[signs == 0] = 1.0
    return components * signs[:, None]


@dataclass
class PCAModel:
    """The full PCA basis and the standardisation statistics (float64), plus provenance.

    Shapes: mean, std, pca_mean, eigenvalues `(D,)`; components `(D, D)` with rows = components in
    order of decreasing eigenvalue. `count` is the number of tokens, `num_images` of images.
    """

    mean: torch.Tensor
    std: torch.Tensor
    pca_mean: torch.Tensor
    components: torch.Tensor
    eigenvalues: torch.Tensor
    count: int
    num_images: int
    encoder_id: str
    source: str = "streaming-float64"
    extra: dict = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    def explained_variance_ratio(self) -> torch.Tensor:
        """Eigenvalues over their sum (the standardised total variance)."""
        return self.eigenvalues / self.eigenvalues.sum()

    def project(self, features: torch.Tensor, rank: int, whiten: bool = False) -> torch.Tensor:
        """Tokens `(..., D)` -> PCA coordinates `(..., rank)`, computed in float64 and returned in
        the input's floating dtype (float32 for integer inputs). Whitening divides each coordinate by
        the square root of its eigenvalue (unit variance); the official code does not whiten."""
        if rank < 1 or rank > self.dim:
            raise PCAError(f"rank={rank} must lie in [1, {self.dim}] (the feature dimension)")
        if features.shape[-1] != self.dim:
            raise PCAError(f"features of dimension {features.shape[-1]} do not match this PCA "
                           f"(dimension {self.dim}, encoder {self.encoder_id})")
        out_dtype = features.dtype if features.is_floating_point() else torch.float32
        x = (features.to(torch.float64) - self.mean) / self.std - self.pca_mean
        coords = x @ self.components[:rank].T
        if whiten:
            coords = coords / self.eigenvalues[:rank].clamp_min(1e-12).sqrt()
        return coords.to(out_dtype)

    def project_map(self, features: torch.Tensor, rank: int, whiten: bool = False) -> torch.Tensor:
        """Feature maps `(B, D, h, w)` -> PCA maps `(B, rank, h, w)` (tokens are the h*w positions)."""
        tokens = features.permute(0, 2, 3, 1)  # (B, h, w, D)
        return self.project(tokens, rank, whiten).permute(0, 3, 1, 2).contiguous()

    # -- storage: safetensors (tensors) + JSON (provenance) --------------------------------------

    def save(self, path: str | Path) -> Path:
        """Write `<path>.safetensors` and `<path>.json` atomically; returns the safetensors path."""
        base = Path(path).with_suffix("")
        tensors = {"mean": self.mean, "std": self.std, "pca_mean": self.pca_mean,
                   "components": self.components, "eigenvalues": self.eigenvalues}
        target = atomic_save_safetensors(base.with_suffix(".safetensors"),
                                         {k: v.to(torch.float64) for k, v in tensors.items()},
                                         metadata={"format": PCA_FORMAT})
        ratio = self.explained_variance_ratio()
        atomic_write_json(base.with_suffix(".json"), {
            "format": PCA_FORMAT, "encoder_id": self.encoder_id, "dim": self.dim,
            "count": self.count, "num_images": self.num_images, "source": self.source,
            "std_ddof": 0, "covariance_ddof": 1, "whiten_stored": False,
            "explained_variance_ratio_top16": ratio[:16].tolist(),
            "eigenvalues_top16": self.eigenvalues[:16].tolist(), "extra": self.extra})
        return target

    @classmethod
    def load(cls, path: str | Path, encoder_id: Optional[str] = None,
             dim: Optional[int] = None) -> "PCAModel":
        """Read a saved PCA; with `encoder_id`/`dim`, raise PCAError when it belongs elsewhere."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        base = Path(path).with_suffix("")
        tensor_file, json_file = base.with_suffix(".safetensors"), base.with_suffix(".json")
        for required in (tensor_file, json_file):
            if not required.is_file():
                raise PCAError(f"PCA file {required} not found (a PCA is a .safetensors + .json pair "
                               "written by `bench prepare`)")
        try:
            tensors = load_file(str(tensor_file))
            info = json.loads(json_file.read_text())
        except (SafetensorError, OSError, ValueError) as err:
            raise PCAError(f"PCA file {tensor_file} is unreadable: {err}") from err
        if info.get("format") != PCA_FORMAT:
            raise PCAError(f"{json_file} has format {info.get('format')!r}, expected {PCA_FORMAT}")
        model = cls(mean=tensors["mean"], std=tensors["std"], pca_mean=tensors["pca_mean"],
                    components=tensors["components"], eigenvalues=tensors["eigenvalues"],
                    count=int(info["count"]), num_images=int(info["num_images"]),
                    encoder_id=str(info["encoder_id"]), source=str(info["source"]),
                    extra=dict(info.get("extra", {})))
        model.check_matches(encoder_id, dim, where=str(tensor_file))
        return model

    def check_matches(self, encoder_id: Optional[str], dim: Optional[int], where: str = "") -> None:
        """Raise PCAError if this PCA was fitted for another encoder or feature dimension."""
        label = where or "the PCA"
        if dim is not None and dim != self.dim:
            raise PCAError(f"{label} has dimension {self.dim} but encoder {encoder_id} gives "
                           f"{dim}-d features; use the PCA fitted for this encoder (or delete it "
                           "and re-run `bench prepare`)")
        if encoder_id is not None and encoder_id != self.encoder_id:
            raise PCAError(f"{label} was fitted on encoder {self.encoder_id!r}, not {encoder_id!r}; "
                           "use the PCA fitted for this encoder (or delete it and re-run prepare)")


def import_official_pca(path: str | Path, encoder_id: str, trust_pickle: bool = False) -> PCAModel:
    """Convert the official `pcs/dino_pca_model.pth` (a torch pickle of {'pca_model': sklearn PCA,
    'mean', 'std'}) into a PCAModel; save it with `.save()` and never unpickle it again.

    Unpickling can execute arbitrary code, so this refuses unless `trust_pickle=True`
    (`--trust-pickle` on the command line) says that you trust the file's source.
    """
    path = Path(path)
    if not trust_pickle:
        raise PCAError(f"{path} is a pickle (an sklearn PCA saved with torch.save); loading it can "
                       "run arbitrary code. Pass trust_pickle=True (--trust-pickle) only if you "
                       "trust its source; it is then converted once to safetensors + JSON")
    if not path.is_file():
        raise PCAError(f"official PCA file {path} not found")
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    try:
        pca, mean, std = checkpoint["pca_model"], checkpoint["mean"], checkpoint["std"]
        components = torch.as_tensor(pca.components_, dtype=torch.float64)
        eigenvalues = torch.as_tensor(pca.explained_variance_, dtype=torch.float64)
        pca_mean = torch.as_tensor(pca.mean_, dtype=torch.float64)
        count = int(getattr(pca, "n_samples_", 0))
    except (KeyError, AttributeError, TypeError) as err:
        raise PCAError(f"{path} does not look like ReDi's dino_pca_model.pth "
                       f"(expected keys pca_model/mean/std): {err}") from err
    mean = torch.as_tensor(mean, dtype=torch.float64).reshape(-1)
    std = torch.as_tensor(std, dtype=torch.float64).reshape(-1)
    if components.shape[0] < components.shape[1]:
        raise PCAError(f"{path} stores only {components.shape[0]} of {components.shape[1]} "
                       "components; the harness expects the full basis")
    return PCAModel(mean=mean, std=std, pca_mean=pca_mean, components=components,
                    eigenvalues=eigenvalues, count=count, num_images=0, encoder_id=encoder_id,
                    source=f"official:{path.name}",
                    extra={"whiten_in_file": bool(getattr(pca, "whiten", False))})
