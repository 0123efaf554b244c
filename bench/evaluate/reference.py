"""The reference side of `bench eval`: which file (or split) the samples are compared with, its
statistics, its images when KID or precision/recall need them, and the facts every eval row records.

`eval.reference` names an ADM-style `.npz` (`arr_0` images and/or precomputed `mu`/`sigma`,
`mu_s`/`sigma_s`); unset, the embedded default compares with its data's TEST split. A scale whose
numbers stand beside the paper's sets `eval.expected_reference` (the paper scale: `adm-imagenet256`,
ADM's `VIRTUAL_imagenet256_labeled.npz`): then an unset or missing file is one error naming the
setting, the file and where to get it, and a file whose SHA-256 is not the published one is
evaluated with a warning and recorded as `reference_is_adm: false`, which the report reads.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from bench.atomic import sha256_file
from bench.config import ADM_IMAGENET256, REFERENCE_BATCHES, ExperimentConfig
from bench.evaluate import adm
from bench.evaluate.features import REFERENCE_IMAGES_KEY, extract_features, reference_statistics
from bench.prepare.sources import open_split


class ReferenceBatchError(ValueError):
    """The reference the settings ask for is not there; the message says where to get it."""


@dataclasses.dataclass
class Reference:
    """Reference statistics (float64), their provenance, the images when KID/PRC need them, and
    ADM's spatial statistics (mu_s, sigma_s) when sFID is asked for."""

    mu: np.ndarray
    sigma: np.ndarray
    provenance: dict
    images: Optional[object]
    spatial: Optional[tuple[np.ndarray, np.ndarray]] = None
    progress: bool = False
    _features: Optional[np.ndarray] = None

    def features(self, network) -> np.ndarray:
        if self._features is None:
            self._features = extract_features(network, self.images, progress=self.progress,
                                              label="reference features")
        return self._features


def reference_file(cfg: ExperimentConfig) -> Optional[Path]:
    """eval.reference as a path (None: the test split), checked against eval.expected_reference."""
    expected = cfg.eval.expected_reference
    batch = REFERENCE_BATCHES.get(expected) if expected else None
    where = (f"; this scale compares with {batch.filename} (eval.expected_reference={expected}): "
             f"download {batch.url} once and set eval.reference=/path/to/{batch.filename}") if batch else ""
    if not cfg.eval.reference:
        if batch:
            raise ReferenceBatchError(f"eval.reference is not set{where}")
        return None
    path = Path(cfg.eval.reference).expanduser()
    if not path.is_file():
        raise ReferenceBatchError(f"eval.reference={path} does not exist{where}")
    return path


def identify(path: Path, expected: Optional[str]) -> dict:
    """The facts recorded about a reference file: path, SHA-256, which published batch it is."""
    sha = sha256_file(path)
    name = adm.identify_reference(sha)
    if expected and name != expected:
        batch = REFERENCE_BATCHES[expected]
        warnings.warn(f"eval.reference={path} has SHA-256 {sha}, not the published {batch.filename} "
                      f"({batch.sha256}); its rows are recorded as reference_is_adm=false and the "
                      "report will not call them comparable with the paper", RuntimeWarning, stacklevel=2)
    return {"reference_source": str(path.resolve()), "reference_sha256": sha,
            "reference_batch": name, "reference_is_adm": name == ADM_IMAGENET256.name,
            "reference_expected": expected}


def load_reference(cfg: ExperimentConfig, network, kinds: Sequence[str], progress: bool = False) -> Reference:
    """The reference of `cfg` for the metric kinds asked: statistics for FID (and sFID), images
    for KID and precision/recall. Statistics of images are cached under data.prepared_dir.
    `progress` reports the feature passes over the reference images (bench.progress)."""

    cache = Path(cfg.data.prepared_dir) / "refstats"
    size = cfg.data.image_size
    path = reference_file(cfg)
    if path is None:
        test = open_split(cfg.data, "test")  # the reference of the embedded default: the TEST split
        images = test.images(range(len(test)))
        mu, sigma, provenance = reference_statistics(images, network, cache, image_size=size, progress=progress)
        provenance |= {"reference_source": f"{cfg.data.name} test split ({len(test)} images)",
                       "reference_batch": None, "reference_is_adm": False, "reference_expected": None}
        spatial = None
        if "sfid" in kinds:
            mu_s, sigma_s, _ = reference_statistics(images, network.spatial, cache, image_size=size,
                                                progress=progress)
            spatial = (mu_s, sigma_s)
        return Reference(mu, sigma, provenance, images if {"kid", "prc"} & set(kinds) else None, spatial,
                         progress)

    facts = identify(path, cfg.eval.expected_reference)
    sha = facts["reference_sha256"]
    mu, sigma, provenance = reference_statistics(path, network, cache, image_size=size, reference_sha256=sha,
                                                   progress=progress)
    spatial = None
    if "sfid" in kinds:
        mu_s, sigma_s, _ = reference_statistics(path, network.spatial, cache, image_size=size,
                                                reference_sha256=sha, progress=progress)
        spatial = (mu_s, sigma_s)
    images = None
    if {"kid", "prc"} & set(kinds):
        with np.load(path, allow_pickle=False) as npz:
            if REFERENCE_IMAGES_KEY not in npz.files:
                raise ReferenceBatchError(f"eval.reference={path} holds only statistics; KID and "
                                          f"precision/recall need its images ('{REFERENCE_IMAGES_KEY}')")
            images = npz[REFERENCE_IMAGES_KEY]
    return Reference(mu, sigma, provenance | facts, images, spatial, progress)
