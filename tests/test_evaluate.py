"""The sampling and evaluation driver (bench.evaluate.sampling, bench.evaluate.score_run) on a tiny trained run.

What is measured: resumed / array-split sampling is bit-identical to an uninterrupted run; a shard
equals an independent re-implementation of the pipeline (checkpoint -> sampler -> VAE decode of the
latent channels / scaling factor -> DiT rounding); FD and accuracy equal an independent float64 /
scipy computation; one eval.jsonl row per (step, metric, setting) with full provenance, and a re-run
writes nothing; bad inputs fail with one clear error before anything is sampled; the semantic PCA
picture equals an eigen-decomposition written here.

The run is trained by the trainer itself (bench.train.loop.train) on `fixtures_train.write_prepared`, with
a tiny AutoencoderKL and evaluation classifier trained for a step or two by bench.prepare.embedded.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from fixtures_train import add_embedded_eval_assets, tiny_config, write_prepared

from bench.config import ConfigError, GuidanceConfig
from bench.evaluate.sampling import (
    SamplingError,
    apply_eval_overrides,
    build_guidance,
    read_shard,
    sample,
    semantic_pca_rgb,
    shard_labels,
)
from bench.evaluate.score_run import (
    EvaluationError,
    evaluate,
    main_eval,
    main_sample,
    missing_evaluations,
)
from bench.metrics_log import MetricsLogger
from bench.prepare.embedded import load_classifier
from bench.runfolder import read_eval_rows, read_run_config
from bench.train.loop import train

SHARD = 8  # 32 samples = 4 shards of 2 batches each: enough structure for resume and array tasks
EVAL_OVERRIDES = ("eval.sampler=euler", "eval.num_sampling_steps=3", "eval.num_samples=32",
                  "eval.batch_size=4", "eval.label_sampling=random")
PROVENANCE = {"step", "metric", "value", "setting", "setting_hash", "backend", "backend_version",
              "feature_network", "feature_weights_sha256", "reference_sha256", "n", "seed",
              "sampler", "sampling_steps", "guidance", "weights", "precision", "wall_time_s",
              "created_at", "checkpoint_sha256", "samples_dir", "label_sampling"}


def _train_decoder_and_classifier(prepared: Path) -> None:
    add_embedded_eval_assets(prepared)


@contextmanager
def _one_thread():
    """One thread: same kernels in every call, and on a busy 2-core machine 20-50x faster than
    two threads fighting other processes for the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _single_thread():
    with _one_thread():
        yield


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("evaluate")
    with _one_thread():
        prepared = write_prepared(root / "prepared")
        _train_decoder_and_classifier(prepared)
        return train(tiny_config(prepared, root / "runs", *EVAL_OVERRIDES))  # checkpoints 2 and 4


@pytest.fixture
def run(trained, tmp_path) -> Path:
    """A private copy of the trained run (tests write samples and eval rows into it)."""
    return Path(shutil.copytree(trained, tmp_path / "run"))


def _shards(result) -> list[dict]:
    return [read_shard(p) for p in result.shards]


def _no_temporaries(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if ".tmp-" in p.name]


# ---------------------------------------------------------------------------------------------
# Sampling: resumable, reproducible, and the pipeline it claims


def test_resumed_sampling_is_bit_identical(run, monkeypatch):
    import bench.evaluate.sampling as sampling

    full = sample(run, 4, shard_size=SHARD, progress=False)
    assert full.complete and full.counts == [8, 8, 8, 8]
    reference = _shards(full)
    # Each shard has its own noise and labels (seeded by its index), not copies of one another.
    assert not np.array_equal(reference[0]["images"], reference[1]["images"])
    shutil.rmtree(full.folder)

    # A "kill" after one shard (max_shards), then an exception inside shard 2 (injected).
    first = sample(run, 4, shard_size=SHARD, max_shards=1, progress=False)
    assert not first.complete and first.sampled_now == 8
    real = sampling._sample_shard

    def dies_at_shard_two(folder, index, *args, **kwargs):
        if index == 2:
            raise RuntimeError("killed")
        return real(folder, index, *args, **kwargs)

    monkeypatch.setattr(sampling, "_sample_shard", dies_at_shard_two)
    with pytest.raises(RuntimeError, match="killed"):
        sample(run, 4, shard_size=SHARD, progress=False)
    assert [p.is_file() for p in first.shards] == [True, True, False, False]
    assert _no_temporaries(first.folder)
    monkeypatch.setattr(sampling, "_sample_shard", real)
    resumed = sample(run, 4, shard_size=SHARD, progress=False)
    assert resumed.complete and resumed.sampled_now == 16  # only shards 2 and 3 were left
    for want, got in zip(reference, _shards(resumed)):
        assert np.array_equal(want["images"], got["images"])  # bit-identical uint8
        assert np.array_equal(want["labels"], got["labels"])

    # Two array tasks, the second first, give the same shards; more samples later reuse them.
    shutil.rmtree(full.folder)
    sample(run, 4, shard_size=SHARD, task_index=1, num_tasks=2, progress=False)
    split = sample(run, 4, shard_size=SHARD, task_index=0, num_tasks=2, progress=False)
    assert split.complete
    for want, got in zip(reference, _shards(split)):
        assert np.array_equal(want["images"], got["images"])
    more = sample(run, 4, shard_size=SHARD, num_samples=40, progress=False)
    assert more.complete and more.sampled_now == 8 and len(more.counts) == 5
    assert (full.folder / "grid.png").is_file() and (full.folder / "grid_semantic_pca.png").is_file()


@pytest.mark.parametrize("use_ema, which", [(True, "ema"), (False, "model")])
def test_shard_equals_independent_pipeline(run, use_ema, which):
    """Shard 0's first batch rebuilt by hand: EMA (or raw) weights, labels and noise from the
    generators of (eval seed, shard 0), Euler, diffusers decode of latents / scaling factor, DiT
    rounding."""
    from diffusers import AutoencoderKL

    from bench.prepare.dataset import read_manifest
    from bench.run_hash import derive_seed
    from bench.runfolder import checkpoint_path
    from bench.train.build import build_model
    from bench.train.checkpoint import load_weights
    from models.flow_sampling import sample_flow
    from models.guidance import Guidance

    result = sample(run, 2, overrides=[f"eval.use_ema={str(use_ema).lower()}"], num_samples=SHARD,
                    shard_size=SHARD, progress=False)
    assert result.setting.weights == ("ema" if use_ema else "raw")
    assert json.loads((result.folder / "plan.json").read_text())["weights"] == result.setting.weights
    shard = read_shard(result.shards[0])
    cfg = read_run_config(run)
    manifest = read_manifest(cfg.data.prepared_dir)
    model = build_model(cfg, manifest)
    model.load_state_dict(load_weights(checkpoint_path(run, 2), which))
    ema, raw = (load_weights(checkpoint_path(run, 2), w) for w in ("ema", "model"))
    assert any(not torch.equal(ema[k], raw[k]) for k in ema)  # so picking the wrong set would fail
    model.eval()
    labels = torch.randint(0, 10, (SHARD,), dtype=torch.long,
                           generator=torch.Generator().manual_seed(derive_seed(0, "sampling", "labels", 0)))
    noise = torch.Generator().manual_seed(derive_seed(0, "sampling", "noise", 0, 0))  # shard 0, batch 0
    batch = cfg.eval.batch_size
    x, z = sample_flow(model, (batch, 4, 8, 8), (batch, cfg.semantic_channels, 8, 8), labels[:batch],
                       Guidance(latent_channels=4, semantic_channels=cfg.semantic_channels), "euler", 3,
                       generator=noise)
    vae = AutoencoderKL.from_pretrained(Path(cfg.data.prepared_dir) / "vae").eval()
    with torch.no_grad():
        decoded = vae.decode(x / manifest["scaling_factor"]).sample.numpy()
    expected = np.clip(127.5 * decoded + 128.0, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    # Exact: labels, noise, weights and the sampler are the same ops in the same order, so the
    # generated semantic channels (and the latents they are denoised with) must match bit for bit.
    assert np.array_equal(shard["labels"], labels.numpy())
    assert np.array_equal(shard["semantic_grid"][:batch], z.numpy())
    # Within one quantisation level: the VAE decoder is a conv net whose float result may differ
    # in the last bits with the batch it runs in and the thread count (oneDNN's blocking), so a
    # value lying on a level boundary may round either way. Tolerance: |difference| <= 1 level and
    # at most 0.1% of the values differ at all (seen: 1 of 12,288 on a loaded 2-core machine).
    got = shard["images"][:batch].astype(np.int16)
    difference = np.abs(got - expected.astype(np.int16))
    assert got.shape == expected.shape and int(difference.max()) <= 1, int(difference.max())
    assert np.count_nonzero(difference) <= 1e-3 * difference.size, np.count_nonzero(difference)


def test_bf16_sampling_is_its_own_setting_and_close_to_fp32(run):
    """eval.precision=bf16 runs the sampler's network under bf16 autocast: another samples folder
    (the precision is in its hash and plan.json), the same labels and noise, and generated semantic
    channels that differ from the fp32 ones, but little. At step 2 of this tiny run the network
    moves z only a little away from its initial noise, so z differs by 6e-6 relative (measured);
    the 1e-3 bound catches a sampler that goes wrong in bf16, and the network's own bf16 error is
    checked against float64 in test_in_precision_runs_the_network_in_bf16_and_returns_fp32."""
    common = dict(num_samples=SHARD, shard_size=SHARD, progress=False)
    fp32 = sample(run, 2, overrides=["eval.precision=fp32"], **common)
    bf16 = sample(run, 2, overrides=["eval.precision=bf16"], **common)
    assert (fp32.setting.precision, bf16.setting.precision) == ("fp32", "bf16")
    assert fp32.folder != bf16.folder
    assert json.loads((bf16.folder / "plan.json").read_text())["precision"] == "bf16"
    ours, theirs = read_shard(bf16.shards[0]), read_shard(fp32.shards[0])
    assert np.array_equal(ours["labels"], theirs["labels"])
    z_bf16, z_fp32 = (torch.from_numpy(s["semantic_grid"]).double() for s in (ours, theirs))
    relative = float((z_bf16 - z_fp32).norm() / z_fp32.norm())
    assert 0 < relative < 1e-3, relative  # > 0: the bf16 path really ran


def test_in_precision_runs_the_network_in_bf16_and_returns_fp32():
    """The sampler's network under in_precision("bf16") against the same network in float64: fp32
    outputs, a relative error of bf16's size (measured 4.2e-3 on this 2-block network: a few
    roundings of 2^-9 per layer) and far above fp32's (2e-7); "fp32" leaves the network as it is."""
    import copy

    from bench.evaluate.sampling import in_precision
    from models.backbone import BackboneConfig, JointDiT

    torch.manual_seed(0)
    model = JointDiT(BackboneConfig(hidden_size=64, depth=2, num_heads=2, input_size=8, patch_size=1,
                                    semantic_channels=4, num_classes=10, fusion="merged")).eval()
    with torch.no_grad():
        for p in model.parameters():  # leave adaLN-Zero, else the output barely depends on the net
            p.add_(0.05 * torch.randn_like(p))
        x, z, t, y = torch.randn(8, 4, 8, 8), torch.randn(8, 4, 8, 8), torch.rand(8), torch.randint(0, 10, (8,))
        reference = copy.deepcopy(model).double()(x.double(), t.double(), y, z.double())
        got = in_precision(model, "bf16", torch.device("cpu"))(x, t, y, z)
    assert in_precision(model, "fp32", torch.device("cpu")) is model
    for name in ("x", "z"):
        ours, exact = getattr(got, name), getattr(reference, name)
        assert ours.dtype == torch.float32
        relative = float((ours.double() - exact).norm() / exact.norm())
        assert 1e-3 < relative < 2e-2, (name, relative)


def test_bf16_sampling_on_a_gpu_without_it_names_the_eval_setting(monkeypatch):
    from bench.evaluate.sampling import sampling_precision

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    cfg = apply_eval_overrides(tiny_config(Path("/nonexistent"), Path("/nonexistent")), ["eval.precision=bf16"])
    with pytest.raises(ConfigError, match=r"^eval\.precision=bf16 but this GPU has no bf16 support"):
        sampling_precision(cfg, torch.device("cuda"))


def test_guidance_settings_reach_the_sampler(run):
    from bench.prepare.dataset import read_manifest
    from models.guidance import Guidance

    cfg = apply_eval_overrides(read_run_config(run), [
        "eval.guidance.cfg_scale=2.4", "eval.guidance.cfg_channels=all", "eval.guidance.interval_low=0.1",
        "eval.guidance.interval_high=0.7", "eval.guidance.rg_scale=1.5", "eval.guidance.rg_channels=latent"])
    with pytest.warns(RuntimeWarning, match="objective.p_drop=0"):  # RG on a run trained without drop
        got = build_guidance(cfg, read_manifest(cfg.data.prepared_dir))
    assert got == Guidance(latent_channels=4, semantic_channels=cfg.semantic_channels, cfg_scale=2.4,
                           cfg_channels="all", interval=(0.1, 0.7), rg_scale=1.5, rg_channels="latent",
                           null_class=10)


def test_balanced_labels_cover_every_class_evenly():
    g = torch.Generator().manual_seed(0)
    labels = torch.cat([shard_labels(start, count, 10, "balanced", g)
                        for start, count in ((0, 16), (16, 16), (32, 5))])  # N = 37
    counts = torch.bincount(labels, minlength=10)
    assert int(counts.min()) == 3 and int(counts.max()) == 4  # floor / ceil of 37 / 10


# ---------------------------------------------------------------------------------------------
# Evaluation: rows, provenance, values, idempotence


def test_every_checkpoint_gets_one_row_per_metric_and_rerun_writes_nothing(run):
    assert missing_evaluations(run, "fd_classifier", "default") == [2, 4]
    rows = evaluate(None, run, shard_size=SHARD, progress=False)
    keys = sorted((r["step"], r["metric"], r["setting"]) for r in rows)
    assert keys == [(s, m, "default") for s in (2, 4) for m in ("accuracy", "fd_classifier")]
    guidance_fields = {f.name for f in dataclasses.fields(GuidanceConfig)}
    for row in rows:
        assert PROVENANCE <= set(row), PROVENANCE - set(row)
        assert set(row["guidance"]) == guidance_fields
        assert row["n"] == 32 and row["sampler"] == "euler" and row["weights"] == "ema"
    before = (run / "eval.jsonl").read_bytes()
    assert evaluate(None, run, shard_size=SHARD, progress=False) == []
    assert (run / "eval.jsonl").read_bytes() == before
    assert missing_evaluations(run, "fd_classifier", "default") == []
    assert missing_evaluations(run, "fd_classifier", "other") == [2, 4]
    assert len(read_eval_rows(run)) == 4
    assert (run / "eval.jsonl").read_text().count("\n") == 4  # one line per row

    # The values, recomputed independently: scipy sqrtm FD in float64 and a plain argmax accuracy.
    from bench.prepare.sources import digits

    fd_row = next(r for r in rows if r["step"] == 4 and r["metric"] == "fd_classifier")
    native = evaluate(None, run, [4], "native", backend="native", shard_size=SHARD, progress=False)
    native_fd = next(r for r in native if r["metric"] == "fd_classifier")
    assert native_fd["samples_dir"] == fd_row["samples_dir"]  # same setting: the samples are reused
    acc_row = next(r for r in rows if r["step"] == 4 and r["metric"] == "accuracy")
    classifier = load_classifier(Path(read_run_config(run).data.prepared_dir) / "classifier")
    shards = [read_shard(p) for p in sorted(Path(fd_row["samples_dir"]).glob("shard-*.npz"))]
    images = torch.from_numpy(np.concatenate([s["images"] for s in shards])).permute(0, 3, 1, 2)
    labels = np.concatenate([s["labels"] for s in shards])
    test = digits("test", 32)
    with torch.no_grad():
        f1 = classifier.features(images).double().numpy()
        f2 = classifier.features(test.images(range(len(test)))).double().numpy()
        predicted = classifier.logits(images).argmax(1).numpy()
    # Independent float64 FD: tr sqrt(S1 S2) from the eigenvalues of sqrt(S2) S1 sqrt(S2) (the
    # driver's backend uses S1 S2 or sqrt(S1) S2 sqrt(S1)); stable although the samples of this
    # barely trained model are so alike that S1 is singular (scipy's sqrtm is not: LinAlgWarning).
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    w2, v2 = np.linalg.eigh(s2)
    root2 = (v2 * np.sqrt(np.clip(w2, 0, None))) @ v2.T
    middle = root2 @ s1 @ root2
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    expected = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt)
    # The features are float32 and their last bits depend on how images are batched (the driver
    # extracts 256 at a time, this test all at once): ~1e-7 relative, which the FD carries linearly.
    assert native_fd["value"] == pytest.approx(expected, rel=1e-6)
    assert fd_row["value"] == pytest.approx(expected, rel=1e-6)
    # Same features and statistics, two sqrt-trace algorithms (eigvals of S1 S2 vs symmetric eigh).
    assert fd_row["value"] == pytest.approx(native_fd["value"], rel=1e-9)
    assert acc_row["value"] == float((predicted == labels).mean())  # same argmax, exact


def test_classifier_is_named_after_the_data_it_was_trained_on(run, tmp_path):
    """The run's prepare is scikit-learn digits: its classifier is no Fashion-MNIST network."""
    import shutil

    from bench.evaluate.features import load_classifier_network

    classifier = Path(read_run_config(run).data.prepared_dir) / "classifier"
    network = load_classifier_network(classifier)
    assert network.network_id.startswith("digits-classifier-d") and "fmnist" not in network.network_id
    shutil.copytree(classifier, tmp_path / "fm" / "classifier")  # the embedded default keeps its name
    (tmp_path / "fm" / "manifest.json").write_text(json.dumps({"data": {"name": "fashion_mnist"}}))
    assert load_classifier_network(tmp_path / "fm" / "classifier").network_id.startswith("fmnist-classifier-d")


def test_all_metrics_on_the_classifier(run):
    """FD, KID, precision/recall and IS on the embedded classifier: KID equals torch-fidelity's
    estimate's own recomputation, precision/recall ADM's float16 computation written in numpy, IS
    a float64 brute-force definition."""
    from test_adm import adm_precision_recall_np, inception_score_scipy

    from bench.evaluate.features import extract_features, load_classifier_network
    from bench.evaluate.quality import kernel_inception_distance

    rows = evaluate(None, run, [4], "full", ["eval.metrics=[fid,kid,prc,is]"], shard_size=SHARD,
                    progress=False)
    by_name = {r["metric"]: r for r in rows}
    assert set(by_name) == {"fd_classifier", "kid_classifier", "precision_classifier",
                            "recall_classifier", "is_classifier", "accuracy"}
    assert all(np.isfinite(r["value"]) for r in rows)
    from bench.prepare.sources import digits

    network = load_classifier_network(Path(read_run_config(run).data.prepared_dir) / "classifier")
    shards = [read_shard(p) for p in sorted(Path(rows[0]["samples_dir"]).glob("shard-*.npz"))]
    images = np.concatenate([s["images"] for s in shards])
    gen = extract_features(network, images)
    test = digits("test", 32)
    real = extract_features(network, test.images(range(len(test))))
    kid = by_name["kid_classifier"]
    mean, std = kernel_inception_distance(gen, real, kid["extra"]["subsets"], kid["extra"]["subset_size"],
                                          kid["extra"]["seed"])
    # float64 on both sides, same subsets: only summation order differs.
    assert kid["value"] == pytest.approx(mean, rel=1e-9, abs=1e-15)
    assert kid["extra"]["std"] == pytest.approx(std, rel=1e-9, abs=1e-15)
    # Precision/recall: ADM's float16 distances (test_adm's numpy version) on the float32 features.
    precision, recall = adm_precision_recall_np(real.astype(np.float32), gen.astype(np.float32), batch=10_000)
    assert (by_name["precision_classifier"]["value"], by_name["recall_classifier"]["value"]) == (precision, recall)
    with torch.no_grad():
        logits = network.logits(torch.from_numpy(images)).double().numpy()
    # ADM's IS on the classifier's logits, one split (N < 5,000): float32 logits, float64 after.
    assert by_name["is_classifier"]["value"] == pytest.approx(inception_score_scipy(logits, 5000), rel=1e-9)
    assert by_name["is_classifier"]["reference_sha256"] is None  # no reference enters the IS


def test_adm_metrics_on_inception_against_a_reference_batch(run, tmp_path, monkeypatch):
    """FID, sFID, IS, precision, recall (and KID) through `bench eval` on the Inception port
    (random weights) against an ADM-layout reference (arr_0 images, mu/sigma, mu_s/sigma_s): each
    value equals an independent float64 computation on the port's outputs, and every row records
    the reference facts and the differences from ADM. The file is not ADM's, so the rows say so."""
    from test_adm import adm_precision_recall_np, inception_score_scipy, random_inception_weights

    import bench.evaluate.quality as quality
    from bench.atomic import sha256_file
    from bench.evaluate.adm import ADM_DIFFERENCES
    from bench.evaluate.features import build_feature_network

    weights = random_inception_weights(tmp_path / "pt_inception-2015-12-05.pth")
    rng = np.random.default_rng(0)
    real = rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    stats = {"mu": rng.normal(size=2048) * 0.1, "sigma": np.diag(rng.uniform(0.5, 1.5, 2048)),
             "mu_s": rng.normal(size=2023) * 0.1, "sigma_s": np.diag(rng.uniform(0.5, 1.5, 2023))}
    reference = tmp_path / "VIRTUAL_imagenet256_labeled.npz"
    np.savez(reference, arr_0=real, **stats)
    # 8 samples stand in for 50K: the sample-count guard of the Frechet distances (tested in
    # test_metrics.py) is lifted, the formulas are the same.
    import bench.evaluate.score_run as evaluation_module

    for module in (quality, evaluation_module):  # both call it: the early check and the metric itself
        monkeypatch.setattr(module, "check_sample_count", lambda *args, **kwargs: None)
    overrides = ["eval.feature_network=inception", f"eval.inception_weights={weights}",
                 f"eval.reference={reference}", "eval.expected_reference=adm-imagenet256",
                 "eval.metrics=[fid,sfid,is,prc,kid]", "eval.num_samples=8"]
    # One BLAS thread for the 2,048-wide eigendecompositions: two OpenBLAS threads on a loaded
    # 2-core machine took 81 s per eigh, one thread 7 s (measured).
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1), pytest.warns(RuntimeWarning, match="not the published VIRTUAL_imagenet256_labeled.npz"):
        rows = evaluate(None, run, [4], "adm", overrides, backend="native", shard_size=SHARD, progress=False)
    by_name = {r["metric"]: r for r in rows}
    assert set(by_name) == {"fid", "sfid", "is", "precision", "recall", "kid"}
    for row in rows:
        assert row["adm_differences"] == ADM_DIFFERENCES and row["feature_network"] == "inception-v3-compat-pool3"
        assert row["feature_implementation"].startswith("torch-fidelity ")
        if row["metric"] != "is":
            assert row["reference_sha256"] == sha256_file(reference) and row["reference_is_adm"] is False
            assert row["reference_expected"] == "adm-imagenet256" and row["reference_batch"] is None
            assert row["reference_source"] == str(reference.resolve())

    network = build_feature_network("inception", inception_weights=weights)
    (shard,) = [read_shard(p) for p in sorted(Path(rows[0]["samples_dir"]).glob("shard-*.npz"))]
    out = {k: v.double().numpy() for k, v in network.outputs(shard["images"]).items()}  # one batch, as eval
    ref_features = network.extract(real).double().numpy()

    def frechet(features: np.ndarray, mu: np.ndarray, sigma_diagonal: np.ndarray) -> float:
        # tr sqrt(S1 S2) = nuclear norm of sqrt(S2) A with S1 = A A^T: no matrix square root at all.
        centred = (features - features.mean(0)) / np.sqrt(len(features) - 1)
        nuclear = np.linalg.svd(np.sqrt(sigma_diagonal)[:, None] * centred.T, compute_uv=False).sum()
        return float(((features.mean(0) - mu) ** 2).sum() + (centred ** 2).sum() + sigma_diagonal.sum()
                     - 2 * nuclear)

    # float64 on both sides from the same float32 features: 1e-9 relative.
    assert by_name["fid"]["value"] == pytest.approx(
        frechet(out["features"], stats["mu"], np.diag(stats["sigma"])), rel=1e-9)
    assert by_name["sfid"]["value"] == pytest.approx(
        frechet(out["spatial"], stats["mu_s"], np.diag(stats["sigma_s"])), rel=1e-9)
    assert by_name["sfid"]["extra"]["feature_dim"] == 2023
    assert by_name["is"]["value"] == pytest.approx(inception_score_scipy(out["logits"], 5000), rel=1e-9)
    expected_pr = adm_precision_recall_np(ref_features.astype(np.float32), out["features"].astype(np.float32),
                                          batch=10_000)
    assert (by_name["precision"]["value"], by_name["recall"]["value"]) == expected_pr


def test_export_writes_the_evaluated_samples_as_adms_npz(run, tmp_path, capsys):
    """`bench export` writes arr_0 uint8 (N, H, W, 3), exactly the evaluated N in sample order, and
    arr_1 the labels; read back the way ADM's evaluator streams it (zip member, .npy header)."""
    import zipfile

    from bench.cli import main

    rows = evaluate(None, run, [4], "default", shard_size=SHARD, progress=False)
    shards = [read_shard(p) for p in sorted(Path(rows[0]["samples_dir"]).glob("shard-*.npz"))]
    images, labels = np.concatenate([s["images"] for s in shards]), np.concatenate([s["labels"] for s in shards])
    out = tmp_path / "samples.npz"
    assert main(["export", str(run), "--step", "4", "--out", str(out)]) == 0
    assert "arr_0 uint8 (32, 32, 32, 3)" in capsys.readouterr().out and _no_temporaries(tmp_path)
    with np.load(out, allow_pickle=False) as npz:
        assert sorted(npz.files) == ["arr_0", "arr_1"]
        assert npz["arr_0"].dtype == np.uint8 and np.array_equal(npz["arr_0"], images)
        assert np.array_equal(npz["arr_1"], labels)
    with zipfile.ZipFile(out) as archive, archive.open("arr_0.npy") as member:  # ADM's reader
        version = np.lib.format.read_magic(member)
        shape, fortran, dtype = {(1, 0): np.lib.format.read_array_header_1_0,
                                 (2, 0): np.lib.format.read_array_header_2_0}[version](member)
        assert (shape, fortran, dtype) == ((32, 32, 32, 3), False, np.dtype(np.uint8))
        assert member.read() == images.tobytes()
    # Fewer images: the first M when their shards are exactly those of M (M = 16: two shards).
    assert main(["export", str(run), "--step", "4", "--num-samples", "16", "--out", str(out)]) == 0
    with np.load(out, allow_pickle=False) as npz:
        assert np.array_equal(npz["arr_0"], images[:16])
    # 20 would need a last shard of 4: not there. An unevaluated setting: nothing to export.
    for args, message in ((["--num-samples", "20"], "does not hold the 20 samples"),
                          (["--setting", "other"], "no rows for step 4, setting 'other'")):
        assert main(["export", str(run), "--step", "4", *args, "--out", str(tmp_path / "x.npz")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "bench export: error:" in err[0] and message in err[0], err
    assert not (tmp_path / "x.npz").exists()


def test_expected_reference_unset_is_one_error_before_sampling(run, capsys):
    from bench.cli import main

    assert main(["eval", str(run), "--step", "4", "eval.expected_reference=adm-imagenet256"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "eval.reference is not set" in err[0]
    assert "VIRTUAL_imagenet256_labeled.npz" in err[0] and not (run / "samples").exists()


def test_a_setting_name_means_one_set_of_samples(run):
    first = evaluate(None, run, [4], "default", shard_size=SHARD, progress=False)
    with pytest.raises(EvaluationError, match="another --setting"):
        evaluate(None, run, [4], "default", ["eval.num_samples=16", "eval.metrics=[kid]"],
                 shard_size=SHARD, progress=False)
    folder = Path(first[0]["samples_dir"])
    shards_before = {p.name: p.stat().st_mtime_ns for p in folder.glob("shard-*.npz")}
    rows = evaluate(None, run, [4], "n16", ["eval.num_samples=16"], shard_size=SHARD, progress=False)
    assert {r["n"] for r in rows} == {16} and rows[0]["samples_dir"] == str(folder)
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("shard-*.npz")} == shards_before


def test_a_given_config_supplies_only_eval_settings(run):
    saved = read_run_config(run)
    other_model = dataclasses.replace(saved, model=dataclasses.replace(saved.model, depth=3))
    with pytest.raises(SamplingError, match="describes another run"):
        evaluate(other_model, run, [4], progress=False)
    fewer = dataclasses.replace(saved, eval=dataclasses.replace(saved.eval, num_samples=16),
                                output_root="/elsewhere")  # not part of the run's identity
    rows = evaluate(fewer, run, [4], "n16", shard_size=SHARD, progress=False)
    assert {r["n"] for r in rows} == {16}


def test_rows_are_appended_once(tmp_path):
    rows = [{"step": 2, "metric": "fd", "setting": "a", "value": 1.0},
            {"step": 2, "metric": "fd", "setting": "b", "value": 2.0}]
    log = MetricsLogger(tmp_path)
    assert log.log_eval(rows) == rows
    assert log.log_eval(rows + rows) == []
    assert read_eval_rows(tmp_path) == rows and _no_temporaries(tmp_path)


# ---------------------------------------------------------------------------------------------
# Bad inputs: one clear error each, before anything is sampled


def test_reference_with_wrong_keys(run, tmp_path):
    path = tmp_path / "ref.npz"
    np.savez(path, images=np.zeros((16, 32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match=r"has keys \['images'\]; expected 'arr_0'"):
        evaluate(None, run, [4], overrides=[f"eval.reference={path}"], progress=False)
    assert not (run / "samples").exists()


def test_reference_images_of_another_size(run, tmp_path):
    path = tmp_path / "ref.npz"
    np.savez(path, arr_0=np.zeros((16, 28, 28, 3), np.uint8))
    with pytest.raises(ValueError, match="are 28x28 but the samples are 32x32"):
        evaluate(None, run, [4], overrides=[f"eval.reference={path}"], progress=False)
    assert not (run / "samples").exists()


def test_run_folder_without_checkpoints(run, capsys):
    shutil.rmtree(run / "checkpoints")
    with pytest.raises(SamplingError, match="holds no checkpoints"):
        evaluate(None, run, progress=False)
    with pytest.raises(SamplingError, match="holds no checkpoints"):
        sample(run, progress=False)
    from bench.cli import main

    assert main(["eval", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bench eval: error:" in err[0] and "no checkpoints" in err[0]


def test_missing_inception_weights_name_the_setting(run, tmp_path, capsys):
    from bench.cli import main
    from bench.evaluate.features import FeatureNetworkError

    missing = tmp_path / "pt_inception.pth"
    with pytest.raises(FeatureNetworkError, match="eval.inception_weights is not set"):
        evaluate(None, run, [4], overrides=["eval.feature_network=inception"], progress=False)
    assert main(["eval", str(run), "--step", "4", "eval.feature_network=inception",
                 f"eval.inception_weights={missing}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"eval.inception_weights is {missing} does not exist" in err[0]
    assert "nothing is downloaded" in err[0] and "Traceback" not in err[0]
    assert not (run / "samples").exists()


@pytest.mark.parametrize("override", ["eval.guidance.cfg_scale=-1", "eval.guidance.rg_scale=-0.5"])
def test_guidance_weights_below_zero(run, override, capsys):
    from bench.cli import main

    key = override.split("=")[0].split(".")[-1]
    with pytest.raises(ConfigError, match=f"{key}=-[0-9.]+ is out of range"):
        evaluate(None, run, [4], overrides=[override], progress=False)
    for command in ("eval", "sample"):  # the command line: one line naming the key, exit 2
        assert main([command, str(run), "--step", "4", override]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"bench {command}: error:" in err[0] and key in err[0], err
    with pytest.raises(ConfigError, match="only eval.key=value overrides"):
        evaluate(None, run, [4], overrides=["model.depth=3"], progress=False)
    assert not (run / "samples").exists()


def test_unknown_step_and_unsupported_metrics(run):
    with pytest.raises(SamplingError, match=r"no checkpoint at steps \[3\]; available: \[2, 4\]"):
        evaluate(None, run, [3], progress=False)
    with pytest.raises(EvaluationError, match="sfid .* needs eval.feature_network=inception, not classifier"):
        evaluate(None, run, [4], overrides=["eval.metrics=[sfid]"], progress=False)
    with pytest.raises(EvaluationError, match="'is' needs class logits"):
        evaluate(None, run, [4], overrides=["eval.metrics=[is]", "eval.feature_network=dinov2"], progress=False)
    with pytest.raises(EvaluationError, match="'accuracy' .* needs eval.feature_network=classifier"):
        evaluate(None, run, [4], overrides=["eval.metrics=[accuracy]", "eval.feature_network=inception"],
                 progress=False)
    assert not (run / "samples").exists()


def test_cli_eval_prints_a_table(run, capsys):
    assert main_eval([str(run), "--step", "2", "--shard-size", str(SHARD), "--no-progress",
                      "eval.num_samples=16"]) == 0
    out = capsys.readouterr().out
    assert "fd_classifier" in out and "accuracy" in out and "2 new row(s)" in out


def test_sampling_seeds_score_one_checkpoint_with_other_noise_and_report_the_spread(run, capsys):
    from bench.report.stats import split_sampling_seed_setting

    argv = [str(run), "--step", "4", "--shard-size", str(SHARD), "--no-progress", "eval.num_samples=16",
            "--sampling-seeds", "0,1,2"]
    assert main_eval(argv) == 0
    out = capsys.readouterr().out
    rows = [r for r in read_eval_rows(run) if r["metric"] == "fd_classifier"]
    assert sorted(r["setting"] for r in rows) == ["default+seed=0", "default+seed=1", "default+seed=2"]
    assert {split_sampling_seed_setting(r["setting"]) for r in rows} == {("default", k) for k in range(3)}
    assert sorted(r["sampling_seed"] for r in rows) == [0, 1, 2] == sorted(r["seed"] for r in rows)
    assert len({r["checkpoint_sha256"] for r in rows}) == 1  # one checkpoint ...
    assert len({r["samples_dir"] for r in rows}) == 3         # ... three sets of samples
    values = [r["value"] for r in sorted(rows, key=lambda r: r["sampling_seed"])]
    assert len(set(values)) == 3  # other labels and noise give other FDs
    assert f"{np.std(values, ddof=1):.4g}" in out and "0: " in out
    # The default seed's row equals a plain evaluation with eval.seed=0 (same samples, same number).
    plain = evaluate(None, run, [4], "plain", ["eval.num_samples=16"], shard_size=SHARD, progress=False)
    assert [r["value"] for r in plain if r["metric"] == "fd_classifier"] == [values[0]]
    assert main_eval(argv) == 0  # a re-run adds no row
    assert len([r for r in read_eval_rows(run) if r["metric"] == "fd_classifier"]) == 4
    assert main_eval([*argv[:-1], "1,x"]) == 2 and "comma-separated integers" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# The semantic channels as RGB (paper Fig. 5)


def _pca_reference(semantic: np.ndarray) -> np.ndarray:
    """Eigen-decomposition of the token covariance (not an SVD), same sign and scaling rules."""
    n, c, h, w = semantic.shape
    tokens = semantic.transpose(0, 2, 3, 1).reshape(-1, c).astype(np.float64)
    centred = tokens - tokens.mean(0)
    values, vectors = np.linalg.eigh(centred.T @ centred)
    top = vectors[:, np.argsort(values)[::-1][:3]].T  # (3, C) descending variance
    top *= np.sign(top[np.arange(3), np.abs(top).argmax(1)])[:, None]
    p = centred @ top.T
    return np.rint((p - p.min(0)) / (p.max(0) - p.min(0)) * 255).reshape(n, h, w, 3)


def test_semantic_pca_picture_matches_eigendecomposition():
    rng = np.random.default_rng(0)
    semantic = rng.normal(size=(3, 5, 4, 4)) * np.array([5.0, 3.0, 2.0, 1.0, 0.5])[None, :, None, None]
    rgb = semantic_pca_rgb(semantic.astype(np.float32), image_size=16)
    assert rgb.shape == (3, 16, 16, 3) and rgb.dtype == np.uint8
    tokens = rgb[:, ::4, ::4]  # one pixel per token; nearest upsampling repeats it 4x4
    assert np.array_equal(rgb, tokens.repeat(4, axis=1).repeat(4, axis=2))
    # eigh vs SVD directions agree to ~1e-12: only a value on a .5 rounding boundary can move a level.
    assert np.abs(tokens.astype(int) - _pca_reference(semantic)).max() <= 1
    assert tokens[..., 0].min() == 0 and tokens[..., 0].max() == 255  # min-max to [0, 255]
    two = semantic_pca_rgb(semantic[:, :2].astype(np.float32), image_size=4)
    assert (two[..., 2] == 0).all()  # fewer than 3 channels: the missing colour is 0


def test_missing_dinov2_weights_name_the_setting(run, tmp_path, capsys):
    """FD-DINOv2 is reachable from the config, and a missing file names eval.dinov2_weights."""
    from bench.cli import main
    from bench.evaluate.features import FeatureNetworkError

    with pytest.raises(FeatureNetworkError, match="eval.dinov2_weights is not set"):
        evaluate(None, run, [4], overrides=["eval.feature_network=dinov2"], progress=False)
    missing = tmp_path / "dinov2_vitl14.pth"
    assert main(["eval", str(run), "--step", "4", "eval.feature_network=dinov2",
                 f"eval.dinov2_weights={missing}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"eval.dinov2_weights is {missing} does not exist" in err[0]
    assert not (run / "samples").exists()


def test_ema_still_close_to_initialisation_warns():
    """0.999 ** 1000 = 37% of the EMA is the initial network: sampling it must not pass silently."""
    import warnings

    from bench.evaluate.sampling import ema_init_weight, warn_if_ema_is_mostly_init

    assert ema_init_weight(0.999, 1000) == pytest.approx(0.3677, abs=1e-4)
    from bench.compose import load_config

    cfg = load_config(["train.ema_decay=0.999"])
    with pytest.warns(RuntimeWarning, match="initial weights 37%"):
        warn_if_ema_is_mostly_init(cfg, 1000)
    for quiet in (load_config(["train.ema_decay=0.99"]),
                  load_config(["train.ema_decay=0.999", "eval.use_ema=false"])):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            warn_if_ema_is_mostly_init(quiet, 1000)  # 0.99 ** 1000 ~ 4e-5; raw weights: no EMA


def test_too_few_samples_for_fd_is_refused_before_sampling(run, capsys):
    """The check used to fire after sampling; now it runs before any sample is drawn, and the
    escape hatch the library had is on the command line."""
    samples_before = sorted(p for p in run.rglob("shard-*.npz"))
    argv = [str(run), "--step", "2", "--setting", "n4", "--shard-size", "2", "--no-progress", "eval.num_samples=4"]
    assert main_eval(argv) == 2
    err = capsys.readouterr().err
    assert "4 samples < 8 feature dimensions" in err and "--allow-rank-deficient" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert sorted(p for p in run.rglob("shard-*.npz")) == samples_before  # nothing was sampled
    assert main_eval([*argv, "--allow-rank-deficient"]) == 0
    assert "fd_classifier" in capsys.readouterr().out
    # The same as a setting (what a grid's eval overrides can carry), recorded in the row's extra.
    assert main_eval([*argv[:4], "n4cfg", *argv[5:], "eval.allow_rank_deficient=true"]) == 0
    rows = [r for r in read_eval_rows(run) if r["setting"] in ("n4", "n4cfg") and r["metric"] == "fd_classifier"]
    assert [r["extra"]["rank_deficient"] for r in rows] == [True, True]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has a GPU: --device cuda is valid here")
def test_device_cuda_without_a_gpu_is_one_line(run, capsys):
    for command in (main_eval, main_sample):
        assert command([str(run), "--step", "2", "--device", "cuda", "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert "--device cuda: no CUDA device is visible" in err and "Traceback" not in err
    assert main_eval([str(run), "--step", "2", "--device", "tpu", "--no-progress"]) == 2
    assert "--device 'tpu' is not a device; use cpu, cuda or cuda:N" in capsys.readouterr().err
