"""`bench prepare` end to end on scikit-learn digits with tiny settings: shard contents against
independent recomputation, resume after a crash, array tasks, caching, and one clear error (and no
partial shard) per kind of bad input."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import importlib.util
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import bench.prepare.shards as shards
from bench.config import DataConfig, EncoderConfig, VAEConfig
from bench.prepare.dataset import PreparedDataError, check_manifest, load_prepared
from bench.prepare.embedded import ClassifierSettings, EmbeddedVAESettings, load_classifier
from bench.prepare.encoders import EncoderError, build_efficientnet_lite0, load_vae
from bench.prepare.pca import PCAError, PCAStats
from bench.prepare.pipeline import PrepareError, PrepareOptions, prepare_embedded, run_prepare
from bench.prepare.sources import DatasetError, center_crop_arr, digits, fashion_mnist, fashion_mnist_available

SIZES = {"train": 96, "test": 40}  # 3 + 2 shards of 32
R_MAX = 4


@pytest.fixture(scope="module")
def tiny_vae_dir(tmp_path_factory):
    """A randomly initialised f=4 AutoencoderKL (32x32 -> 4x8x8): the pipeline, not its quality."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 8, 8), layers_per_block=1, latent_channels=4,
                        norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3)
    folder = tmp_path_factory.mktemp("vae") / "tiny"
    vae.save_pretrained(folder)
    return folder


def _configs(out: Path, vae_dir: Path, **encoder):
    # fp32 unless asked: the shards are checked against an independent fp32 computation
    return (DataConfig(name="digits", prepared_dir=str(out)),
            VAEConfig(kind="diffusers", path=str(vae_dir), scaling_factor=0.5),
            EncoderConfig(pca_rank_max=R_MAX, **({"precision": "fp32"} | encoder)))


def _options(**kw) -> PrepareOptions:
    # EfficientNet at 64 px: block 7 gives a 4x4 grid, resized to the 8x8 latent grid at load.
    base = dict(shard_size=32, batch_size=16, max_images=dict(SIZES), efficientnet_input_size=64,
                train_classifier=False, progress=False)
    return PrepareOptions(**(base | kw))


def _shards(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {str(p.relative_to(out)): load_file(str(p)) for p in sorted(out.glob("*/shard-*.safetensors"))}


def _leftovers(out: Path) -> list[str]:
    """Pass-1 files and temporaries: what a finished or failed prepare must not leave."""
    return [p.name for p in out.rglob("*") if ".tmp-" in p.name or p.name.endswith(".enc.safetensors")]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, tiny_vae_dir):
    out = tmp_path_factory.mktemp("prepared") / "ref"
    run_prepare(*_configs(out, tiny_vae_dir), _options())
    return out


def test_shards_match_independent_computation(reference_run, tiny_vae_dir):
    out = reference_run
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"]["train"]["count"] == 96 and manifest["splits"]["test"]["count"] == 40
    assert manifest["latent_grid"] == [8, 8] and manifest["semantic_grid"] == [4, 4]
    assert manifest["r_max"] == R_MAX and manifest["scaling_factor"] == 0.5
    assert manifest["encoder"]["encoder_id"] == "efficientnet_lite0_block7_64px"
    assert not _leftovers(out)

    # Recompute everything for the train split, outside the pipeline.
    source = digits("train")
    images, labels = source.images(range(96)), source.labels[:96]
    encoder = build_efficientnet_lite0(32, input_size=64)
    feats = torch.cat([encoder.encode(images[i:i + 16]) for i in range(0, 96, 16)])  # (96, 80, 4, 4)
    tokens = feats.permute(0, 2, 3, 1).reshape(-1, 80).double().numpy()
    mean, std = tokens.mean(0), tokens.std(0)
    values, vectors = np.linalg.eigh(np.cov((tokens - mean) / std, rowvar=False))
    values, vectors = values[::-1], vectors[:, ::-1].T

    ds = load_prepared(out, "train", rank=3)
    assert torch.equal(ds.labels, labels)
    assert ds.moments.shape == (96, 8, 8, 8) and ds.semantic.shape == (96, 3, 8, 8)
    assert ds.features.shape == (96, 80, 4, 4) and ds.features.dtype == torch.float16
    vae = load_vae(VAEConfig(kind="diffusers", path=str(tiny_vae_dir)))
    # Same network, same batches: float32 agreement.
    torch.testing.assert_close(ds.moments, vae.encode_moments(images), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ds.features.float(), feats, atol=2e-3 * float(feats.abs().max()),
                               rtol=1e-3)  # float16 storage: 2^-11 relative rounding
    eig = torch.tensor(manifest["pca"]["eigenvalues"])
    # The streamed float64 fit vs a one-shot float64 fit of the same float32 features.
    np.testing.assert_allclose(eig.numpy(), values[:R_MAX], rtol=1e-6)
    # Semantic channels: official pipeline on the float16 features, then bilinear to 8x8.
    comps = vectors[:3].copy()
    signs = np.sign(comps[np.arange(3), np.abs(comps).argmax(1)])
    z = ((ds.features.double().permute(0, 2, 3, 1).numpy() - mean) / std) @ (comps * signs[:, None]).T
    expected = F.interpolate(torch.from_numpy(z).permute(0, 3, 1, 2), size=(8, 8), mode="bilinear",
                             align_corners=False)
    torch.testing.assert_close(ds.semantic.double(), expected, atol=1e-4, rtol=1e-4)

    whitened = load_prepared(out, "train", rank=3, whiten=True)
    torch.testing.assert_close(whitened.semantic, ds.semantic / eig[:3].sqrt().view(1, 3, 1, 1))
    lazy = load_prepared(out, "test", rank=2, in_memory=False)
    eager = load_prepared(out, "test", rank=2)
    item = lazy[37]
    for key, value in (("moments", eager.moments), ("semantic", eager.semantic),
                       ("label", eager.labels), ("features", eager.features)):
        torch.testing.assert_close(item[key], value[37])
    with pytest.raises(PreparedDataError, match="model.pca_rank=5"):
        load_prepared(out, "train", rank=5)
    with pytest.raises(PreparedDataError, match="come from encoder"):
        check_manifest(ds.manifest, encoder_id="dinov2_vitb14_reg_224px")


def test_second_call_is_cached(reference_run, tiny_vae_dir, capsys, monkeypatch):
    mtimes = {p: p.stat().st_mtime_ns for p in reference_run.rglob("*") if p.is_file()}

    def no_encoding(*args, **kwargs):
        raise AssertionError("a cached prepare encoded a shard")

    # No encoding at all, checked directly: a wall-time bound (it was < 5 s) fails on a busy machine.
    monkeypatch.setattr(shards, "encode_shard", no_encoding)
    run_prepare(*_configs(reference_run, tiny_vae_dir), _options())
    assert "up to date" in capsys.readouterr().out
    assert mtimes == {p: p.stat().st_mtime_ns for p in reference_run.rglob("*") if p.is_file()}


def test_crash_and_resume_equals_uninterrupted(reference_run, tiny_vae_dir, tmp_path, monkeypatch):
    out = tmp_path / "resumed"
    real = shards.encode_shard
    calls = []

    def crash_after_two(*args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated kill after shard 2")
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(shards, "encode_shard", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        run_prepare(*_configs(out, tiny_vae_dir), _options())
    finished = sorted(p.name for p in out.rglob("*.enc.safetensors"))
    assert finished == ["shard-00000.enc.safetensors", "shard-00001.enc.safetensors"]
    assert not (out / "manifest.json").exists() and not list(out.rglob("*.tmp-*"))
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.enc.safetensors")}

    resumed = []
    monkeypatch.setattr(shards, "encode_shard", lambda *a, **k: resumed.append(1) or real(*a, **k))
    monkeypatch.setattr(shards, "project_shard", _checking_projection(mtimes, shards.project_shard))
    run_prepare(*_configs(out, tiny_vae_dir), _options())
    assert len(resumed) == 3  # 5 shards in all, 2 were finished before the crash
    reference, again = _shards(reference_run), _shards(out)
    assert reference.keys() == again.keys()
    for name in reference:
        for key in reference[name]:
            assert torch.equal(reference[name][key], again[name][key]), (name, key)
    assert load_file(str(out / "pca.safetensors")).keys() == load_file(
        str(reference_run / "pca.safetensors")).keys()
    for key, value in load_file(str(reference_run / "pca.safetensors")).items():
        assert torch.equal(value, load_file(str(out / "pca.safetensors"))[key]), key


def _checking_projection(mtimes, real):
    """Pass 2 wrapper asserting that pass-1 files from before the crash were not rewritten."""
    def project(out, split, index, *args):
        enc = out / split / f"shard-{index:05d}.enc.safetensors"
        if enc in mtimes:
            assert enc.stat().st_mtime_ns == mtimes[enc]
        return real(out, split, index, *args)
    return project


def test_array_tasks_equal_single_run(reference_run, tiny_vae_dir, tmp_path, capsys):
    out = tmp_path / "array"
    run_prepare(*_configs(out, tiny_vae_dir), _options(task_index=1, task_count=2))
    assert "waits for the other tasks" in capsys.readouterr().out
    assert not (out / "pca.safetensors").exists() and not (out / "manifest.json").exists()
    os.environ["SLURM_ARRAY_TASK_ID"], os.environ["SLURM_ARRAY_TASK_COUNT"] = "0", "2"
    try:
        run_prepare(*_configs(out, tiny_vae_dir), _options())  # task from the SLURM variables
    finally:
        del os.environ["SLURM_ARRAY_TASK_ID"], os.environ["SLURM_ARRAY_TASK_COUNT"]
    assert not (out / "manifest.json").exists()  # task 1 still has to project its shards
    run_prepare(*_configs(out, tiny_vae_dir), _options(task_index=1, task_count=2))
    reference, arrayed = _shards(reference_run), _shards(out)
    assert reference.keys() == arrayed.keys()
    for name in reference:
        for key in reference[name]:
            assert torch.equal(reference[name][key], arrayed[name][key]), (name, key)


def test_two_lanes_claim_shards_and_equal_a_single_run(reference_run, tiny_vae_dir, tmp_path, monkeypatch):
    """This machine's lanes (lanes=2) take shards as they free up (O_EXCL claims in a temporary
    folder, removed afterwards), every shard exactly once, and the result is byte-identical."""
    import tempfile

    claimed, claim = [], shards.claim_shard

    def recording_claim(folder, split, index):  # lane 0 runs in this process: its claims are seen
        won = claim(folder, split, index)
        claimed.append((folder, split, index, won))
        return won

    monkeypatch.setattr(shards, "claim_shard", recording_claim)
    claims_before = set(Path(tempfile.gettempdir()).glob("redi-bench-prepare-claims-*"))
    out = tmp_path / "lanes"
    run_prepare(*_configs(out, tiny_vae_dir), _options(lanes=2))
    won = [(split, index) for _, split, index, ok in claimed if ok]
    assert claimed and len(won) == len(set(won)) and len({c[0] for c in claimed}) == 1
    assert set(Path(tempfile.gettempdir()).glob("redi-bench-prepare-claims-*")) == claims_before
    assert not Path(claimed[0][0]).exists() and not _leftovers(out)
    reference, laned = _shards(reference_run), _shards(out)
    assert reference.keys() == laned.keys()
    for name in reference:
        for key in reference[name]:
            assert torch.equal(reference[name][key], laned[name][key]), (name, key)


def test_other_settings_in_same_folder(reference_run, tiny_vae_dir, tmp_path):
    out = tmp_path / "p"
    run_prepare(*_configs(out, tiny_vae_dir), _options(max_images={"train": 32, "test": 8}))
    with pytest.raises(PrepareError, match="other settings"):
        run_prepare(*_configs(out, tiny_vae_dir), _options(max_images={"train": 32, "test": 16}))
    run_prepare(*_configs(out, tiny_vae_dir),
                _options(max_images={"train": 32, "test": 16}, overwrite=True))
    assert json.loads((out / "manifest.json").read_text())["splits"]["test"]["count"] == 16


def _no_shards(out: Path) -> bool:
    return not out.exists() or (not list(out.rglob("shard-*")) and not list(out.rglob("*.tmp-*")))


def test_mismatched_pca_file(reference_run, tiny_vae_dir, tmp_path):
    other = PCAStats(80).update(torch.randn(200, 80)).finalize("dinov2_vitb14_reg_224px")
    other.save(tmp_path / "other.safetensors")
    out = tmp_path / "p"
    with pytest.raises(PCAError, match="fitted on encoder 'dinov2_vitb14_reg_224px'"):
        run_prepare(*_configs(out, tiny_vae_dir), _options(pca_path=str(tmp_path / "other")))
    wrong_dim = PCAStats(16).update(torch.randn(100, 16)).finalize("efficientnet_lite0_block7_64px")
    wrong_dim.save(tmp_path / "small.safetensors")
    with pytest.raises(PCAError, match="dimension 16"):
        run_prepare(*_configs(out, tiny_vae_dir), _options(pca_path=str(tmp_path / "small")))
    from sklearn.decomposition import PCA

    official = tmp_path / "dino_pca_model.pth"
    torch.save({"pca_model": PCA().fit(np.random.default_rng(0).normal(size=(100, 80))),
                "mean": np.zeros(80, np.float32), "std": np.ones(80, np.float32)}, official)
    with pytest.raises(PCAError, match="trust_pickle"):
        run_prepare(*_configs(out, tiny_vae_dir), _options(official_pca=str(official)))
    assert _no_shards(out)
    # A PCA of the right encoder is used as is (not refitted).
    run_prepare(*_configs(out, tiny_vae_dir),
                _options(pca_path=str(reference_run / "pca"), max_images={"train": 32, "test": 8}))
    assert torch.equal(load_file(str(out / "pca.safetensors"))["components"],
                       load_file(str(reference_run / "pca.safetensors"))["components"])
    assert not (out / "pca_stats.safetensors").exists()


def test_missing_weights(tiny_vae_dir, tmp_path):
    out = tmp_path / "p"
    with pytest.raises(EncoderError, match="encoder.weights: file"):
        run_prepare(*_configs(out, tiny_vae_dir, weights=str(tmp_path / "none.pth")), _options())
    with pytest.raises(EncoderError, match="vae.path"):
        run_prepare(*_configs(out, tmp_path / "no_vae"), _options())
    assert _no_shards(out)


def _png(path: Path, width: int, height: int, seed: int) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)


def test_image_folder_errors(tiny_vae_dir, tmp_path):
    root = tmp_path / "images"
    vae = VAEConfig(kind="diffusers", path=str(tiny_vae_dir))
    enc = EncoderConfig(pca_rank_max=2)
    out = tmp_path / "p"
    (root / "train" / "cat").mkdir(parents=True)
    with pytest.raises(DatasetError, match="empty"):
        run_prepare(DataConfig(name="imagefolder", root=str(root), image_size=256,
                               prepared_dir=str(out)), vae, enc, _options(splits=("train",)))
    for i in range(3):
        _png(root / "train" / "cat" / f"{i}.png", 300, 260, i)
    (root / "train" / "cat" / "3.png").write_bytes(b"not a png at all")
    with pytest.raises(DatasetError, match="data.image_size=100"):
        run_prepare(DataConfig(name="imagefolder", root=str(root), image_size=100,
                               prepared_dir=str(out)), vae, enc, _options(splits=("train",)))
    with pytest.raises(DatasetError, match=r"cannot decode image .*3\.png"):
        run_prepare(DataConfig(name="imagefolder", root=str(root), image_size=256,
                               prepared_dir=str(out)), vae, enc,
                    _options(splits=("train",), shard_size=2, batch_size=2, max_images={}))
    # The shard holding the corrupt image was never written, whole or partial.
    assert not (out / "train" / "shard-00001.enc.safetensors").exists()
    assert not list(out.rglob("*.tmp-*")) and not list(out.rglob("shard-00001*"))
    with pytest.raises(DatasetError, match="data.image_size=8"):
        run_prepare(DataConfig(name="fashion_mnist", root=str(tmp_path), image_size=8,
                               prepared_dir=str(tmp_path / "q")), vae, enc, _options())


def test_center_crop_matches_adm_arithmetic():
    """512x768 at S=256: one BOX halving (2x2 means) to 256x384, no-op resize, crop 64 px each side."""
    from PIL import Image

    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (512, 768, 3), dtype=np.uint8)
    got = center_crop_arr(Image.fromarray(arr), 256)
    halved = arr.reshape(256, 2, 384, 2, 3).astype(np.float64).mean(axis=(1, 3))
    assert got.shape == (256, 256, 3)
    assert np.abs(got.astype(np.float64) - halved[:, 64:320]).max() <= 1.0  # PIL rounds to uint8


def test_embedded_pipeline_on_digits(tmp_path):
    options = _options(vae=EmbeddedVAESettings(block_out_channels=(8, 16, 16), steps=3,
                                               batch_size=16, scale_images=64),
                       classifier=ClassifierSettings(width=8, feature_dim=16, epochs=0.25),
                       train_classifier=True, max_images={"train": 32, "test": 16})
    out = prepare_embedded(tmp_path / "a", data_name="digits", options=options, pca_rank_max=R_MAX)
    manifest = json.loads((out / "manifest.json").read_text())
    vae_config = json.loads((out / "vae" / "config.json").read_text())
    assert manifest["vae"]["kind"] == "embedded" and manifest["latent_grid"] == [8, 8]
    assert manifest["scaling_factor"] == pytest.approx(vae_config["scaling_factor"])
    assert "stand-in for DINOv2" in manifest["encoder"]["description"]
    info = json.loads((out / "classifier" / "classifier.json").read_text())
    assert manifest["classifier"]["test_accuracy"] == info["test_accuracy"]
    classifier = load_classifier(out / "classifier")
    batch = digits("test").images(range(4))
    assert classifier.features(batch).shape == (4, 16) and classifier.logits(batch).shape == (4, 10)
    torch.testing.assert_close(classifier.logits(batch), classifier.logits(batch.float()))
    with pytest.raises(ValueError, match="0..255"):
        classifier.logits(batch.float() / 127.5 - 1.0)
    # Reproducible from the seed: a second folder gives identical weights and shards.
    again = prepare_embedded(tmp_path / "b", data_name="digits", options=options, pca_rank_max=R_MAX)
    first, second = _shards(out), _shards(again)
    for name in first:
        for key in first[name]:
            assert torch.equal(first[name][key], second[name][key]), (name, key)
    weights = load_file(str(out / "vae" / "diffusion_pytorch_model.safetensors"))
    weights2 = load_file(str(again / "vae" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(weights[k], weights2[k]) for k in weights)


# ---------------------------------------------------------------------------------------------
# The command line: `bench prepare` in a subprocess, a real SIGKILL, and its one-line errors.

REPO = Path(__file__).resolve().parents[1]
CLI_SIZES = ("--shard-size", "8", "--batch-size", "8", "--max-images", "train=48",
             "--max-images", "test=16", "--no-progress", "--no-classifier")  # 6 + 2 shards


def _cli(out: Path, vae_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "bench.cli", "prepare", "data.name=digits", f"data.prepared_dir={out}",
            "vae.kind=diffusers", f"vae.path={vae_dir}", "vae.scaling_factor=0.5",
            f"encoder.pca_rank_max={R_MAX}", f"model.pca_rank={R_MAX}", *CLI_SIZES, *extra]


def _cli_env() -> dict:
    # One thread: the killed-and-resumed run must reproduce the reference run's bits.
    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, tiny_vae_dir):
    out = tmp_path_factory.mktemp("cli") / "prepared"
    result = subprocess.run(_cli(out, tiny_vae_dir), env=_cli_env(), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return out, result.stdout


def test_cli_help_works():
    script = Path(sys.executable).with_name("bench")  # the console script of pyproject.toml
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "bench.cli"]
    result = subprocess.run([*command, "prepare", "--help"], env=_cli_env(), capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for flag in ("--shard-size", "--task-index", "--max-images", "--official-pca", "--trust-pickle",
                 "--no-classifier", "scale=paper"):
        assert flag in result.stdout, flag


def test_cli_prepares_digits(cli_run):
    out, stdout = cli_run
    assert "images/s" in stdout and "finished" in stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"]["train"]["count"] == 48 and manifest["splits"]["test"]["count"] == 16
    assert len(manifest["splits"]["train"]["shards"]) == 6 and manifest["r_max"] == R_MAX
    assert manifest["classifier"] is None and not (out / "classifier").exists()  # --no-classifier
    assert not _leftovers(out)
    ds = load_prepared(out, "train", rank=R_MAX)
    assert torch.equal(ds.labels, digits("train").labels[:48])
    assert ds.semantic.shape == (48, R_MAX, 8, 8) and ds.moments.shape == (48, 8, 8, 8)


@pytest.mark.timeout(300)
def test_cli_sigkill_midway_then_rerun_equals_uninterrupted(cli_run, tiny_vae_dir, tmp_path):
    reference, _ = cli_run
    out = tmp_path / "killed"
    command = _cli(out, tiny_vae_dir)
    process = subprocess.Popen(command, env=_cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        if list((out / "train").glob("shard-*.enc.safetensors")):
            break
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "prepare finished before it could be killed"
    encoded = sorted(p.name for p in out.rglob("*.enc.safetensors"))
    assert encoded and not (out / "manifest.json").exists() and not list(out.rglob("shard-?????.safetensors"))
    # What a kill during a write leaves behind: a temporary file, never a partial shard.
    stale = out / "train" / ".shard-00005.enc.safetensors.tmp-99999-x"
    stale.write_bytes(b"partial")

    result = subprocess.run(command, env=_cli_env(), capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    done = int(re.search(r"encoded (\d+) images", result.stdout).group(1))
    assert done == 64 - 8 * len(encoded)  # only the shards that were not finished are encoded again
    assert not stale.exists() and not _leftovers(out)
    first, again = _shards(reference), _shards(out)
    assert first.keys() == again.keys() and len(first) == 8
    for name in first:
        for key in first[name]:
            assert torch.equal(first[name][key], again[name][key]), (name, key)
    for key, value in load_file(str(reference / "pca.safetensors")).items():
        assert torch.equal(value, load_file(str(out / "pca.safetensors"))[key]), key


def test_cli_errors_are_one_line_and_write_nothing(tiny_vae_dir, tmp_path, capsys):
    from sklearn.decomposition import PCA

    from bench.cli import main as bench

    official = tmp_path / "dino_pca_model.pth"
    torch.save({"pca_model": PCA().fit(np.random.default_rng(0).normal(size=(100, 80))),
                "mean": np.zeros(80, np.float32), "std": np.ones(80, np.float32)}, official)
    cases = [(["--official-pca", str(official)], "--trust-pickle"),
             ([f"encoder.weights={tmp_path / 'none.pth'}"], "encoder.weights: file"),
             (["data.image_size=12"], "data.image_size=12")]
    for extra, fragment in cases:  # in process (bench.cli's handler), options before overrides too
        out = tmp_path / "p"
        assert bench(_cli(out, tiny_vae_dir, *extra)[3:]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("bench prepare: error:") and fragment in err and "\n" not in err, err
        assert not out.exists()


def test_official_pca_is_unpickled_once(tiny_vae_dir, tmp_path, monkeypatch):
    """After the conversion, a resumed prepare reads the safetensors copy, not the pickle."""
    from sklearn.decomposition import PCA

    official = tmp_path / "dino_pca_model.pth"
    torch.save({"pca_model": PCA().fit(np.random.default_rng(0).normal(size=(200, 80))),
                "mean": np.zeros(80, np.float32), "std": np.ones(80, np.float32)}, official)
    out = tmp_path / "p"
    small = dict(official_pca=str(official), trust_pickle=True, max_images={"train": 16, "test": 8})
    with pytest.raises(PCAError, match="DINOv2 ViT-B/14-reg features, but the encoder is 'efficientnet"):
        run_prepare(*_configs(out, tiny_vae_dir), _options(**small))
    assert not out.exists()
    monkeypatch.setattr(shards, "OFFICIAL_PCA_ENCODER", "efficientnet_lite0_")  # an 80-d stand-in file
    run_prepare(*_configs(out, tiny_vae_dir), _options(**small))
    assert json.loads((out / "pca.json").read_text())["source"] == "official:dino_pca_model.pth"
    (out / "manifest.json").unlink()  # as if killed before the end
    (out / "test" / "shard-00000.safetensors").unlink()

    def refuse(*args, **kwargs):
        raise AssertionError("the pickle was loaded again")

    monkeypatch.setattr(shards, "import_official_pca", refuse)
    run_prepare(*_configs(out, tiny_vae_dir), _options(**small))
    assert (out / "manifest.json").is_file()


def test_atomic_module_does_not_import_torch():
    code = "import sys, bench.atomic; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], env=_cli_env(), capture_output=True, text=True,
                            timeout=60)
    assert result.stdout.strip() == "False", result.stderr


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST from Debian's idx.gz files


# `make test` installs it (as root); CI (REDI_BENCH_CI=1, set by .ci/run) must run this test, so there a
# missing dataset is a failure, never a silent skip.
@pytest.mark.skipif(not fashion_mnist_available() and not os.environ.get("REDI_BENCH_CI"),
                    reason="dataset-fashion-mnist is not installed (`make data` as root installs it)")
def test_fashion_mnist_is_padded_to_32_rgb():
    from bench.prepare.sources import FASHION_MNIST_DIR, FASHION_MNIST_FILES, read_idx_gz

    source = fashion_mnist("test", 32)
    raw = read_idx_gz(Path(FASHION_MNIST_DIR) / FASHION_MNIST_FILES["test"][0])  # (10000, 28, 28)
    assert len(source) == 10_000 and raw.shape == (10_000, 28, 28)
    assert torch.equal(torch.bincount(source.labels), torch.full((10,), 1000))  # 1000 per class
    images = source.images([0, 1, 9_999])
    assert images.shape == (3, 3, 32, 32) and images.dtype == torch.uint8
    assert torch.equal(images[:, 0], images[:, 1]) and torch.equal(images[:, 0], images[:, 2])
    assert torch.equal(images[:, 0, 2:30, 2:30], torch.from_numpy(raw[[0, 1, 9_999]].copy()))
    border = images[:, :, [0, 1, 30, 31], :].sum() + images[:, :, :, [0, 1, 30, 31]].sum()
    assert int(border) == 0  # zero padding: the background colour


def test_fashion_mnist_bad_files_are_clear_errors(tmp_path):
    import gzip

    from bench.prepare.sources import FASHION_MNIST_FILES

    for image_file, label_file in FASHION_MNIST_FILES.values():
        with gzip.open(tmp_path / image_file, "wb") as handle:  # header: 2 images of 28x28, 10 bytes
            handle.write(bytes([0, 0, 8, 3]) + (2).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + bytes(10))
        with gzip.open(tmp_path / label_file, "wb") as handle:
            handle.write(b"junk")
    with pytest.raises(DatasetError, match="header says"):
        fashion_mnist("train", 32, root=str(tmp_path))
    with pytest.raises(DatasetError, match=r"data.root: .*not found"):
        fashion_mnist("train", 32, root=str(tmp_path / "empty"))


def test_loading_a_vae_prints_no_accelerate_notice(tiny_vae_dir):
    """diffusers prints six lines about `accelerate` on every VAE load (every evaluation) unless
    low_cpu_mem_usage is stated; a fresh interpreter, as a user's command, must print nothing."""
    code = ("import sys; from bench.config import VAEConfig; from bench.prepare.encoders import load_vae; "
            f"vae = load_vae(VAEConfig(kind='diffusers', path={str(tiny_vae_dir)!r}, scaling_factor=1.0)); "
            "print(type(vae.vae).__name__)")
    result = subprocess.run([sys.executable, "-c", code], env=_cli_env(), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "AutoencoderKL", result.stderr
    assert "accelerate" not in result.stderr and "low_cpu_mem_usage" not in result.stderr, result.stderr
    # the notice is real without the stated option: the test would catch its return
    if importlib.util.find_spec("accelerate") is None:
        plain = subprocess.run([sys.executable, "-c", "from diffusers import AutoencoderKL; "
                                f"AutoencoderKL.from_pretrained({str(tiny_vae_dir)!r})"],
                               env=_cli_env(), capture_output=True, text=True, timeout=120)
        assert "`accelerate` was not found" in plain.stderr


# ---------------------------------------------------------------------------------------------
# Damaged prepared data: every file is in the manifest with its size and sha256; sizes are checked
# whenever the folder is read, content when a shard is loaded, hashes on request (--verify); each
# failure names the file and the command that rebuilds it.


@pytest.fixture(scope="module")
def embedded_reference(tmp_path_factory):
    """An embedded prepare (its VAE and classifier live in the folder, so the manifest lists them)."""
    options = _options(vae=EmbeddedVAESettings(block_out_channels=(8, 16, 16), steps=3, batch_size=16,
                                               scale_images=64),
                       classifier=ClassifierSettings(width=8, feature_dim=16, epochs=0.25),
                       train_classifier=True, max_images={"train": 64, "test": 32})
    out = tmp_path_factory.mktemp("integrity") / "ref"
    prepare_embedded(out, data_name="digits", options=options, pca_rank_max=R_MAX)
    return out, options


def _copy(reference: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(reference, tmp_path / "copy"))


def _rebuild(out: Path, options: PrepareOptions, capsys) -> str:
    from dataclasses import replace

    capsys.readouterr()
    prepare_embedded(out, data_name="digits", options=replace(options, verify=True), pca_rank_max=R_MAX)
    return capsys.readouterr().out


def _same_files(a: Path, b: Path) -> None:
    manifest_a, manifest_b = (json.loads((p / "manifest.json").read_text()) for p in (a, b))
    wall_clock = {"vae/training.json", "classifier/classifier.json"}  # they record seconds
    assert {k: v for k, v in manifest_a["files"].items() if k not in wall_clock} == \
        {k: v for k, v in manifest_b["files"].items() if k not in wall_clock}


def test_manifest_lists_every_file_with_its_checksum(embedded_reference):
    from bench.atomic import sha256_file

    out, _ = embedded_reference
    files = json.loads((out / "manifest.json").read_text())["files"]
    assert {"train/shard-00000.safetensors", "test/shard-00000.safetensors", "pca.safetensors",
            "vae/diffusion_pytorch_model.safetensors", "vae/config.json",
            "classifier/model.safetensors"} <= set(files)
    for name, record in files.items():
        assert record == {"bytes": (out / name).stat().st_size, "sha256": sha256_file(out / name)}, name


def test_truncated_shard_names_the_file_and_is_rebuilt(embedded_reference, tmp_path, capsys):
    reference, options = embedded_reference
    out = _copy(reference, tmp_path)
    shard = out / "train" / "shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(PreparedDataError,
                       match=rf"{shard} is 1000 bytes.*bench prepare --verify data.prepared_dir={out}"):
        load_prepared(out, "train", rank=R_MAX)
    printed = _rebuild(out, options, capsys)
    assert f"damaged: {shard} is 1000 bytes" in printed and "rebuilding 1 file(s)" in printed
    assert shard.read_bytes() == (reference / "train" / "shard-00001.safetensors").read_bytes()
    _same_files(reference, out)


@pytest.mark.parametrize("damage", ["random bytes", "NaN in semantic", "label out of range"])
def test_same_size_damage_is_caught_on_load_and_by_verify(embedded_reference, tmp_path, capsys, damage):
    from safetensors.torch import save_file

    reference, options = embedded_reference
    out = _copy(reference, tmp_path)
    shard = out / "train" / "shard-00000.safetensors"
    size = shard.stat().st_size
    if damage == "random bytes":
        data = bytearray(shard.read_bytes())
        data[200:] = np.random.default_rng(0).integers(0, 256, len(data) - 200, dtype=np.uint8).tobytes()
        shard.write_bytes(bytes(data))
        expected = "cannot be read|holds"
    else:
        tensors = load_file(str(shard))
        if damage == "NaN in semantic":
            tensors["semantic"][3, 1, 2, 2] = float("nan")
            expected = "holds NaN or infinite values in 'semantic'"
        else:
            tensors["labels"][5] = 77
            expected = r"holds labels outside \[0, 10\)"
        save_file(tensors, str(shard), metadata={"format": "redi-bench-prepared/1"})
    assert shard.stat().st_size == size  # the size check cannot see it
    with pytest.raises(PreparedDataError, match=rf"prepared shard {shard} ({expected}).*bench prepare --verify"):
        load_prepared(out, "train", rank=R_MAX)
    printed = _rebuild(out, options, capsys)
    assert f"{shard} does not match its sha256" in printed
    assert shard.read_bytes() == (reference / "train" / "shard-00000.safetensors").read_bytes()
    load_prepared(out, "train", rank=R_MAX)


def test_invalid_manifest_names_the_file_and_is_rebuilt(embedded_reference, tmp_path, capsys):
    reference, options = embedded_reference
    out = _copy(reference, tmp_path)
    (out / "manifest.json").write_text('{"format": "redi-bench-pre')
    with pytest.raises(PreparedDataError, match=rf"{out / 'manifest.json'} is not valid JSON.*bench prepare --verify"):
        load_prepared(out, "train", rank=R_MAX)
    printed = _rebuild(out, options, capsys)
    assert "rebuilding it" in printed and "encoded 0 images" not in printed
    _same_files(reference, out)


def test_truncated_vae_is_noticed_by_training_and_rebuilt(embedded_reference, tmp_path, capsys):
    from bench.prepare.dataset import read_manifest

    reference, options = embedded_reference
    out = _copy(reference, tmp_path)
    weights = out / "vae" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(PreparedDataError, match=rf"{weights} is \d+ bytes, the manifest says"):
        read_manifest(out)
    from fixtures_train import tiny_config  # bench train notices it before it trains a step

    from bench.train.loop import train
    with pytest.raises(ValueError, match=rf"{weights} is \d+ bytes.*bench prepare --verify"):
        train(tiny_config(out, tmp_path / "runs"), tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()
    printed = _rebuild(out, options, capsys)
    assert f"damaged: {weights}" in printed  # the VAE is retrained, and every shard re-encoded
    assert weights.read_bytes() == (reference / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()
    _same_files(reference, out)


def test_verify_on_an_intact_folder_says_so(embedded_reference, capsys):
    reference, options = embedded_reference
    printed = _rebuild(reference, options, capsys)
    files = len(json.loads((reference / "manifest.json").read_text())["files"])
    assert "up to date" in printed and f"{files} files match their sha256" in printed


@pytest.mark.timeout(600)
def test_cli_kill9_at_each_point_then_rerun_is_byte_identical(cli_run, tiny_vae_dir, tmp_path):
    """Deterministic kills (REDI_BENCH_KILL_AT, bench.atomic.crash_point), one run after another
    in the same folder, each resuming what the previous left: while a pass-1 shard is written (data
    in its temporary file, not yet renamed), while the PCA is written, right after a final shard is
    in place (its pass-1 file not yet removed) and while the manifest is written. The last, unkilled
    run must leave every file byte-identical to an uninterrupted run's; the manifest differs only in
    its `timings` (wall-clock seconds and the images the last run encoded)."""
    reference, _ = cli_run
    out = tmp_path / "killed"
    for point in ("atomic:shard-00002.enc.safetensors", "atomic:pca.safetensors",
                  "prepare:projected:test/0", "atomic:manifest.json"):
        killed = subprocess.run(_cli(out, tiny_vae_dir), env={**_cli_env(), "REDI_BENCH_KILL_AT": point},
                                capture_output=True, text=True, timeout=240)
        assert killed.returncode == -signal.SIGKILL, f"{point} was not reached:\n{killed.stdout}{killed.stderr}"
        assert not (out / "manifest.json").exists()
    result = subprocess.run(_cli(out, tiny_vae_dir), env=_cli_env(), capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    _assert_same_folder(reference, out)


def _assert_same_folder(reference: Path, out: Path) -> None:
    """Every file of `out` byte-identical to `reference`'s; the manifest equal but for its timings."""
    files = sorted(str(p.relative_to(reference)) for p in reference.rglob("*") if p.is_file())
    assert files == sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    for name in files:
        if name == "manifest.json":
            first, again = (json.loads((d / name).read_text()) for d in (reference, out))
            assert {**first, "timings": None} == {**again, "timings": None}
        else:
            assert (reference / name).read_bytes() == (out / name).read_bytes(), name


@pytest.mark.timeout(600)
def test_two_tasks_that_finish_together_fit_the_pca_one_after_the_other(cli_run, tiny_vae_dir, tmp_path):
    """Array tasks that find every train shard's sums at the same moment both go for the PCA. Task 0
    is stopped (REDI_BENCH_KILL_AT=...:STOP) with the sums present and none read; task 1, run again
    meanwhile, must wait for the folder's PCA lock rather than fit and project beside it, which
    removes a pass-1 file task 0 is about to read. Resumed, both finish and the folder equals an
    uninterrupted run's."""
    reference, _ = cli_run
    out = tmp_path / "together"

    def task(index: int) -> list[str]:
        return [*_cli(out, tiny_vae_dir), "--task-index", str(index), "--task-count", "2"]

    alone = subprocess.run(task(1), env=_cli_env(), capture_output=True, text=True, timeout=240)
    assert alone.returncode == 0 and "waits for the other tasks" in alone.stdout, alone.stdout + alone.stderr
    first = subprocess.Popen(task(0), env={**_cli_env(), "REDI_BENCH_KILL_AT": "prepare:pca-fit:STOP"},
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = tmp_path / "second.log"
    second = None
    try:
        _, status = os.waitpid(first.pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status), f"task 0 ended before fitting the PCA: {first.communicate()}"
        with open(log, "w") as handle:
            second = subprocess.Popen(task(1), env=_cli_env(), stdout=handle, stderr=subprocess.STDOUT)
        deadline = time.time() + 240  # until it waits for the lock (or, unlocked, has finished beside task 0)
        while second.poll() is None and "waiting for it" not in log.read_text() and time.time() < deadline:
            time.sleep(0.2)
        first.send_signal(signal.SIGCONT)
        printed, _ = first.communicate(timeout=240)
        second.wait(timeout=240)
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()
    assert first.returncode == 0, printed
    assert second.returncode == 0 and "another task is fitting or writing the PCA" in log.read_text(), log.read_text()
    _assert_same_folder(reference, out)
