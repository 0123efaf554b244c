"""`bench doctor` passes on a healthy machine: on a freshly prepared embedded folder named by a
relative path (the torchrun child of ddp/gloo runs in a temporary folder), and on the paper scale's
miniature (its small check model is shallower than the paper's align_layer 8; the weights files a
fresh node has not fetched yet are skipped with the reason, not failed)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json

import pytest
import torch
from fixtures_train import R_MAX, write_prepared

from bench.cli import main as bench

pytestmark = [pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path of bench doctor"),
              pytest.mark.timeout(600)]
SPECS = "latent_only,repa,redi,redi_repa"


def _lines(out: str) -> dict[str, str]:
    return {line.split()[1].rstrip(":"): line.split()[0] for line in out.splitlines()
            if line.split() and line.split()[0] in ("PASS", "FAIL", "SKIP")}


def _no_fail(out: str) -> dict[str, str]:
    status = _lines(out)
    assert status and "FAIL" not in status.values(), out
    return status


def test_embedded_scale_on_a_freshly_prepared_folder(tmp_path, monkeypatch, capsys):
    from bench.prepare.embedded import EmbeddedVAESettings
    from bench.prepare.pipeline import PrepareOptions, prepare_embedded

    monkeypatch.chdir(tmp_path)  # data.prepared_dir stays relative, as the default results/prepared
    options = PrepareOptions(shard_size=32, batch_size=16, max_images={"train": 48, "test": 16},
                             efficientnet_input_size=64, train_classifier=False, progress=False,
                             vae=EmbeddedVAESettings(block_out_channels=(8, 16, 16), steps=3, batch_size=16,
                                                     scale_images=64))
    prepare_embedded("prepared", data_name="digits", options=options, pca_rank_max=R_MAX)
    code = bench(["doctor", "scale=embedded", "data.name=digits", "data.prepared_dir=prepared",
                  f"model.pca_rank={R_MAX}", "--specs", SPECS])
    out = capsys.readouterr().out
    status = _no_fail(out)
    assert code == 0
    assert status["ddp/gloo"] == "PASS" and status["data/prepared"] == "PASS", out
    assert {status[f"loss/{s}/cpu"] for s in SPECS.split(",")} == {"PASS"}, out


def _paper_prepared(root):
    """The fixture's shards with a manifest as `bench prepare scale=paper` writes it (ImageNet 256,
    SD-VAE, DINOv2-B/14-reg); the tensors' sizes stay tiny."""
    folder = write_prepared(root, encoder_id="dinov2_vitb14_reg_224px")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["data"] = {"name": "imagefolder", "image_size": 256, "num_classes": 1000}
    manifest["vae"] = {**manifest["vae"], "kind": "diffusers", "path": "stabilityai/sd-vae-ft-ema",
                       "scaling_factor": 0.18215}
    manifest["scaling_factor"] = 0.18215
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def test_paper_scale_miniature(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _paper_prepared(tmp_path / "prepared")
    code = bench(["doctor", "scale=paper", "data.prepared_dir=prepared", f"model.pca_rank={R_MAX}",
                  f"encoder.pca_rank_max={R_MAX}", "objective.projector_hidden=32", "--specs", SPECS])
    out = capsys.readouterr().out
    status = _no_fail(out)
    assert code == 0
    # The REPA terms at the check model's own depth (2 < the paper's align_layer 8).
    assert status["loss/repa/cpu"] == "PASS" and status["loss/redi_repa/cpu"] == "PASS", out
    assert status["ddp/gloo"] == "PASS" and status["data/prepared"] == "PASS", out
    for name, setting in (("encoder", "encoder.weights"), ("inception", "eval.inception_weights"),
                          ("reference", "eval.reference")):
        assert status[f"weights/{name}"] == "SKIP", out
        assert f"SKIP weights/{name}: {setting} is not set" in out


def test_a_named_weights_file_that_is_missing_still_fails(tmp_path, capsys):
    code = bench(["doctor", "scale=paper", f"encoder.weights={tmp_path / 'absent.pth'}",
                  f"data.prepared_dir={tmp_path / 'none'}", "--skip", "loss,ddp,throughput"])
    out = capsys.readouterr().out
    status = _lines(out)
    assert code == 1 and status["weights/encoder"] == "FAIL" and "does not exist" in out, out
    assert status["data/prepared"] == "SKIP" and "does not exist yet" in out, out


def test_paths_given_to_the_torchrun_children_are_absolute(tmp_path, monkeypatch):
    from bench.compose import load_config
    from bench.perf.doctor import with_absolute_paths

    monkeypatch.chdir(tmp_path)
    (tmp_path / "vae").mkdir()
    cfg = with_absolute_paths(load_config(["scale=paper", "data.prepared_dir=prepared", "data.root=imagenet",
                                           "encoder.weights=w/dino.pth", "eval.reference=ref.npz"]))
    assert (cfg.data.prepared_dir, cfg.data.root, cfg.encoder.weights, cfg.eval.reference, cfg.output_root) == \
        tuple(str(tmp_path / p) for p in ("prepared", "imagenet", "w/dino.pth", "ref.npz", "results/runs"))
    assert cfg.vae.path == "stabilityai/sd-vae-ft-ema"  # a Hub id, not a folder here: left as written
    assert with_absolute_paths(load_config(["scale=paper", "vae.path=vae"])).vae.path == str(tmp_path / "vae")
