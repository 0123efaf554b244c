"""The prepared-data manifest is a typed contract (bench.prepare.dataset.Manifest): read and
checked once, frozen, one PCA-rank check shared by the loader and the trainer, and a broken file
is one error naming the file, the key and the command that rebuilds it."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
from fixtures_train import R_MAX, prepared_dir, tiny_config  # noqa: F401

from bench.config import ConfigError
from bench.prepare.dataset import MANIFEST, Manifest, PreparedDataError, load_prepared, read_manifest
from bench.train.data import check_prepared


def test_manifest_is_read_into_a_frozen_typed_dataclass(prepared_dir):
    manifest = read_manifest(prepared_dir)
    raw = json.loads((prepared_dir / MANIFEST).read_text())
    assert isinstance(manifest, Manifest) and manifest.folder == prepared_dir
    assert manifest.r_max == R_MAX and manifest.latent_grid == tuple(raw["latent_grid"])
    assert isinstance(manifest.latent_grid, tuple) and manifest.store_features is raw["store_features"]
    assert dict(manifest) == raw  # the JSON as written stays readable as a mapping
    with pytest.raises(dataclasses.FrozenInstanceError):
        manifest.r_max = 99


def test_one_rank_check_serves_the_loader_and_the_trainer(prepared_dir, tmp_path):
    manifest = read_manifest(prepared_dir)
    manifest.check_rank(R_MAX)  # the largest stored rank is fine
    message = rf"model.pca_rank={R_MAX + 1} exceeds the {R_MAX} PCA coordinates stored in {prepared_dir}"
    with pytest.raises(PreparedDataError, match=message):
        manifest.check_rank(R_MAX + 1)
    with pytest.raises(PreparedDataError, match=message):
        load_prepared(prepared_dir, "train", rank=R_MAX + 1)
    cfg = tiny_config(prepared_dir, tmp_path, f"model.pca_rank={R_MAX + 1}", f"encoder.pca_rank_max={R_MAX + 1}")
    with pytest.raises(ConfigError, match=message):  # bench train and bench perf say the same
        check_prepared(cfg, manifest, str(prepared_dir))


@pytest.mark.parametrize("edit, message", [
    (lambda text: text[: len(text) // 2], r"manifest.json is not valid JSON .*rebuild it: `bench prepare --verify"),
    (lambda text: json.dumps({k: v for k, v in json.loads(text).items() if k != "r_max"}),
     r"manifest.json has no 'r_max'; re-run `bench prepare`"),
    (lambda text: json.dumps({**json.loads(text), "latent_grid": [8]}),
     r"manifest.json: latent_grid=\[8\] is not \[height, width\]; re-run `bench prepare`"),
    (lambda text: json.dumps({**json.loads(text), "r_max": "4"}), r"r_max='4' is not an integer > 0"),
    (lambda text: json.dumps({**json.loads(text), "format": "other/0"}), r"has format 'other/0'"),
])
def test_a_broken_manifest_is_one_error_naming_the_file_and_the_fix(prepared_dir, tmp_path, edit, message):
    folder = tmp_path / "prepared"
    shutil.copytree(prepared_dir, folder)
    path = folder / MANIFEST
    path.write_text(edit(path.read_text()))
    with pytest.raises(PreparedDataError, match=message) as caught:
        read_manifest(folder)
    assert str(path) in str(caught.value)
