"""A separate alignment encoder: REPA targets from a second prepared folder (data.align_prepared_dir,
objective.align_encoder), while latents, PCA channels and labels come from data.prepared_dir.

The two folders are written by `fixtures_train.write_prepared` with the same images (indices) but
different stored features, so a test can tell whose features were the target."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from fixtures_train import GRID, one_thread, tensors_of, tiny_config, write_prepared  # noqa: F401

from bench import runfolder
from bench.compose import load_config
from bench.config import ConfigError
from bench.run_hash import run_dir, run_hash
from bench.train.data import GlobalBatchSampler
from bench.train.loop import train

TRAIN_COUNT, BATCH = 48, 8
ALIGN_ID = "dinov2_vitb14_224px"  # what `bench prepare` records for DINOv2-B/14 without registers


def features(seed: int, dim: int) -> torch.Tensor:
    return torch.randn(TRAIN_COUNT, dim, GRID, GRID, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("align")
    main_features, align_16, align_24 = features(1, 16), features(2, 16), features(3, 24)
    return {
        "main": write_prepared(root / "main", features=main_features), "main_features": main_features,
        # Same images, other encoder: 16 channels (as the main folder) and 24 (the projector's size follows).
        "align16": write_prepared(root / "align16", seed=5, encoder_id=ALIGN_ID, features=align_16),
        "align16_features": align_16,
        "align24": write_prepared(root / "align24", seed=6, encoder_id=ALIGN_ID, features=align_24),
        "align24_features": align_24,
    }


def align_overrides(folder: Path, encoder: str = "dinov2_vitb14") -> list[str]:
    return [f"data.align_prepared_dir={folder}", f"objective.align_encoder={encoder}"]


def cosine_loss_f64(aligned: torch.Tensor, stored: torch.Tensor) -> float:
    """-cos(projector token, target token) averaged over samples and tokens, in float64, written
    out here (not models.repa): the target is the stored float16 map (B, D, 8, 8) taken as 64 tokens
    in row-major order (the token grid equals the stored grid, so nothing is resized)."""
    target = stored.half().double().flatten(2).transpose(1, 2)  # (B, L, D)
    a = aligned.double()
    cos = (a * target).sum(-1) / (a.norm(dim=-1) * target.norm(dim=-1))
    return float(-cos.mean())


@pytest.mark.parametrize("spec,align", [("repa", "align24"), ("redi_repa", "align16")])
def test_the_target_is_the_second_folders_features(spec, align, folders, tmp_path, monkeypatch):
    """One training step: the logged loss/repa equals the cosine loss, computed here in float64, of
    the projector's output against the SECOND folder's features of the step's rows."""
    import bench.train.loop as loop

    captured, real_build = [], loop.build_model

    def build_and_watch(*args, **kwargs):
        model = real_build(*args, **kwargs)
        model.projector.register_forward_hook(lambda module, inputs, output: captured.append(output.detach()))
        return model

    monkeypatch.setattr(loop, "build_model", build_and_watch)
    cfg = tiny_config(folders["main"], tmp_path, "train.max_steps=1", *align_overrides(folders[align]), spec=spec)
    out = train(cfg)
    assert len(captured) == 1
    rows = GlobalBatchSampler(TRAIN_COUNT, BATCH, cfg.train.seed).indices(0)  # step 1 = global batch 0
    expected = cosine_loss_f64(captured[0], folders[f"{align}_features"][rows])
    logged = runfolder.read_jsonl(out / runfolder.METRICS_FILE)[0]["loss/repa"]
    # 1e-5 absolute: the logged value is the float32 mean of 512 cosines in [-1, 1] (rounding ~1e-7).
    assert logged == pytest.approx(expected, abs=1e-5)
    if align == "align16":  # same width as the main folder's features, so the test can tell them apart
        wrong = cosine_loss_f64(captured[0], folders["main_features"][rows])
        assert abs(wrong - logged) > 1e-3, (wrong, logged)
    # Provenance: the config names the encoder and the folder, the checkpoint the manifest's encoder_id.
    saved = json.loads((out / "config.json").read_text())
    assert saved["objective"]["align_encoder"] == "dinov2_vitb14"
    assert saved["data"]["align_prepared_dir"] == str(folders[align])
    state = json.loads((out / "checkpoints" / "0000001" / "state.json").read_text())["state"]
    assert state["align"] == {"encoder_id": ALIGN_ID, "prepared": "test-" + ("6" if align == "align24" else "5")}


def test_a_run_aligned_to_a_wider_encoder_samples(folders, tmp_path):
    """The projector is sized by the alignment encoder (24 channels, the main folder has 16); the
    sampler drops it, so such a run loads for sampling from the main folder's manifest alone."""
    from bench.evaluate.sampling import load_sampling_model
    from bench.prepare.dataset import read_manifest

    cfg = tiny_config(folders["main"], tmp_path, "train.max_steps=2", *align_overrides(folders["align24"]),
                      spec="repa")
    out = train(cfg)
    assert tensors_of(out / "checkpoints" / "0000002")["model.projector.4.weight"].shape[0] == 24
    model, _ = load_sampling_model(out, cfg, read_manifest(folders["main"]), 2, True, torch.device("cpu"))
    assert model.projector is None


def _rewrite_manifest(folder: Path, **data) -> Path:
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["data"].update(data)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


@pytest.mark.parametrize("case,fragments", [
    ("reordered", ["not hold the same images in the same order", "row 0 is image 0", "but 47"]),
    ("fewer", ["not hold the same images", "split sizes are {'train': 48}", "{'train': 40}"]),
    ("other_dataset", ["data.name is 'digits'", "'fashion_mnist'"]),
    ("no_features", ["store_features=false"]),
    ("other_encoder", ["dinov2_vitb14_reg_224px", "objective.align_encoder=dinov2_vitb14"]),
])
def test_mismatched_folders_give_one_clear_error_and_write_nothing(case, fragments, folders, tmp_path):
    root = tmp_path / "bad"
    bad = {
        "reordered": lambda: write_prepared(root, encoder_id=ALIGN_ID, image_indices=torch.arange(TRAIN_COUNT).flip(0)),
        "fewer": lambda: write_prepared(root, encoder_id=ALIGN_ID, train_count=40),
        "other_dataset": lambda: _rewrite_manifest(write_prepared(root, encoder_id=ALIGN_ID), name="fashion_mnist"),
        "no_features": lambda: write_prepared(root, encoder_id=ALIGN_ID, store_features=False),
        "other_encoder": lambda: write_prepared(root, encoder_id="dinov2_vitb14_reg_224px"),
    }[case]()
    cfg = tiny_config(folders["main"], tmp_path / "runs", *align_overrides(bad), spec="repa")
    with pytest.raises(ConfigError) as err:
        train(cfg)
    assert str(err.value).startswith(f"data.align_prepared_dir={bad}")
    for fragment in fragments:
        assert fragment in str(err.value)
    assert not run_dir(cfg).exists()


@pytest.mark.parametrize("overrides,fragment", [
    (["data.align_prepared_dir=/x"], "objective.align_encoder is not"),
    (["objective.align_encoder=dinov2_vitb14"], "data.align_prepared_dir is not"),
    (["data.align_prepared_dir=/x", "objective.align_encoder=dinov2_vitb14", "spec=redi"], "lambda_repa=0"),
    (["data.align_prepared_dir=/x", "objective.align_encoder=dinov2_vitb14", "spec=repa",
      "encoder.online_features=true"], "choose one"),
    (["data.align_prepared_dir=/x", "objective.align_encoder=dinov2_vitb15", "spec=repa"], "dinov2_vitb14"),
])
def test_incomplete_or_contradictory_settings_fail_at_load(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(")):
        load_config(overrides)


def test_the_alignment_encoder_is_in_the_run_hash_only_when_set():
    # Hashes of main before the setting existed: unset, they must not move (existing run folders;
    # both scales compiled no step then, and scale=embedded trained in fp32; `auto` for both now).
    assert run_hash(load_config(["spec=repa", "train.precision=fp32", "train.compile=false"])) == "5a69c8f9"
    assert run_hash(load_config(["scale=paper", "spec=repa", "train.compile=false"])) == "4eacb17b"
    assert run_hash(load_config(["scale=paper", "spec=redi_repa", "train.compile=false"])) == "c096e6fd"
    base = ["scale=paper", "spec=repa", "train.compile=false", "data.align_prepared_dir=/data/a"]
    vitb14 = run_hash(load_config([*base, "objective.align_encoder=dinov2_vitb14"]))
    assert vitb14 not in ("4eacb17b", run_hash(load_config([*base, "objective.align_encoder=dinov2_vitb14_reg"])))
    # The folder is a path (not in the hash): moving the prepared data keeps the run.
    assert vitb14 == run_hash(load_config(["scale=paper", "spec=repa", "train.compile=false",
                                           "data.align_prepared_dir=/elsewhere",
                                           "objective.align_encoder=dinov2_vitb14"]))


@pytest.mark.timeout(300)
def test_two_gloo_ranks_align_to_the_second_folder_as_one_process(folders, tmp_path):
    """Each rank reads its own rows of the second folder's features: two gloo ranks train the weights
    one process trains (1e-5: float32 summation order only, as tests/test_ddp.py measures)."""
    from test_ddp import train_one_thread, train_two_gloo_ranks

    steps = 3
    cfg = tiny_config(folders["main"], tmp_path / "runs", f"train.max_steps={steps}", "train.ckpt_every=3",
                      *align_overrides(folders["align24"]), spec="redi_repa")
    single = tensors_of(train_one_thread(cfg, tmp_path / "single") / "checkpoints" / f"{steps:07d}")
    train_two_gloo_ranks(cfg, tmp_path, tmp_path / "ddp")
    ddp = tensors_of(tmp_path / "ddp" / "checkpoints" / f"{steps:07d}")
    assert single["model.projector.4.weight"].shape[0] == 24
    assert max((single[k] - ddp[k]).abs().max().item() for k in single) < 1e-5
    single_log = runfolder.read_jsonl(tmp_path / "single" / runfolder.METRICS_FILE)
    ddp_log = runfolder.read_jsonl(tmp_path / "ddp" / runfolder.METRICS_FILE)
    for x, y in zip(single_log, ddp_log):
        assert y["loss/repa"] == pytest.approx(x["loss/repa"], rel=1e-6, abs=1e-7)


def test_cosine_loss_helper_matches_the_definition():
    """The float64 reference above agrees with F.cosine_similarity (so a wrong helper cannot hide)."""
    a, b = torch.randn(2, 64, 5, dtype=torch.float64), torch.randn(2, 5, 8, 8)
    reference = -F.cosine_similarity(a, b.half().double().flatten(2).transpose(1, 2), dim=-1).mean()
    assert cosine_loss_f64(a, b) == pytest.approx(float(reference), abs=1e-12)


def test_the_report_tells_apart_runs_aligned_to_another_encoder():
    """Two REPA runs that differ only in the alignment encoder are two rows of `bench report`, not
    two seeds of one: unset (None in config.json, or absent from an older one) is a value of its own."""
    import numpy as np
    import pandas as pd

    from bench.report.conditions import label_runs

    base = {"status": "done", "train.seed": 0, "model.size": "XL/2"}
    runs = pd.DataFrame([
        {"run": "a", "spec": "repa", "objective.align_encoder": None, **base},
        {"run": "b", "spec": "repa", "objective.align_encoder": "dinov2_vitb14", **base},
        {"run": "c", "spec": "redi", "objective.align_encoder": np.nan, **base},  # an older config.json
    ])
    labelled, _ = label_runs(runs, {})
    assert labelled["condition"].tolist() == ["SiT-XL/2 w/ REPA (align_encoder=unset)",
                                              "SiT-XL/2 w/ REPA (align_encoder=dinov2_vitb14)",
                                              "SiT-XL/2 w/ ReDi (align_encoder=unset)"]
    # Without a second alignment encoder in the grid, nothing changes in the labels.
    assert label_runs(runs.drop(index=1), {})[0]["condition"].tolist() == ["SiT-XL/2 w/ REPA", "SiT-XL/2 w/ ReDi"]


def test_a_resume_refuses_other_alignment_targets(folders, tmp_path):
    """The folder is a path, not in the run hash: a resume checks the checkpoint's record of the
    alignment targets (encoder_id and the folder's settings hash) against the folder given now."""
    import shutil

    cfg = tiny_config(folders["main"], tmp_path / "runs", "train.max_steps=2", "train.ckpt_every=1",
                      *align_overrides(folders["align16"]), spec="repa")
    out = train(cfg)
    (out / runfolder.DONE_FILE).unlink()
    shutil.rmtree(out / "checkpoints" / "0000002")  # resume from step 1
    other = write_prepared(tmp_path / "other", seed=7, encoder_id=ALIGN_ID, features=folders["align16_features"])
    moved = tiny_config(folders["main"], tmp_path / "runs", "train.max_steps=2", "train.ckpt_every=1",
                        *align_overrides(other), spec="repa")
    assert run_dir(moved) == out
    with pytest.raises(ConfigError, match="was trained on REPA targets from .*test-5"):
        train(moved)
    assert train(cfg) == out and runfolder.is_done(out)  # the original folder resumes
