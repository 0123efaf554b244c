"""`bench doctor` on a machine without a GPU: the CPU checks run and pass on a sound setup, fail
with a named reason on a broken one, and the GPU checks say they were skipped."""

from __future__ import annotations

import contextlib
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from fixtures_train import R_MAX, write_prepared

from bench.cli import main as bench

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path of bench doctor")


@pytest.fixture()
def overrides(tmp_path):
    prepared = write_prepared(tmp_path / "prepared")
    return [f"data.prepared_dir={prepared}", "data.name=digits", f"model.pca_rank={R_MAX}",
            f"encoder.pca_rank_max={R_MAX}", "objective.align_layer=1", "objective.projector_hidden=32",
            "--specs", "latent_only,redi,redi_repa", "--size", "custom:2,32,2,1"]


def _lines(out: str) -> dict[str, str]:
    return {line.split()[1].rstrip(":"): line.split()[0] for line in out.splitlines()
            if line.split() and line.split()[0] in ("PASS", "FAIL", "SKIP")}


def test_sound_setup_passes_and_names_what_it_skipped(overrides, capsys):
    # The DDP checks start torchrun twice each: the two tests below run them.
    assert bench(["doctor", *overrides, "--skip", "ddp"]) == 0
    status = _lines(capsys.readouterr().out)
    assert {status[f"loss/{s}/cpu"] for s in ("latent_only", "redi", "redi_repa")} == {"PASS"}
    assert status["data/prepared"] == "PASS"
    for skipped in ("loss/*/cuda", "throughput/latent_only", "weights/vae", "weights/inception"):
        assert status[skipped] == "SKIP", skipped


@pytest.mark.timeout(300)
def test_without_gpus_the_nccl_check_is_skipped_and_its_gloo_twin_passes(overrides, capsys):
    """The 2-rank step against the 1-rank step, as on a GPU node but with gloo on 2 CPU processes."""
    code = bench(["doctor", *overrides, "spec=redi_repa", "--skip", "loss,weights,data,throughput"])
    out = capsys.readouterr().out
    status = _lines(out)
    assert code == 0 and status["ddp/nccl"] == "SKIP" and status["ddp/gloo"] == "PASS", out
    assert "ddp/gloo runs the same check" in out and "NCCL itself is not exercised" in out


@pytest.mark.timeout(300)
def test_the_ddp_check_fails_when_the_two_rank_step_differs(overrides):
    """Not vacuous: the REPA term weighted 1% more on the 2-rank run only scales the projector's
    gradient by ~1.01 (1e-2 relative, against 4.9e-7 measured for a sound pair): it must fail."""
    from bench.perf.doctor import ddp_check

    config = [o for o in overrides if "=" in o and not o.startswith("-")]
    tiny = [*config, "spec=redi_repa", "model.size=custom", "model.depth=2", "model.hidden_size=32",
            "model.num_heads=2", "model.patch_size=2", "train.batch_size=8"]
    check = ddp_check(tiny, backend="gloo", two_rank_overrides=["objective.lambda_repa=0.505"])
    assert check.status == "FAIL" and "2-rank gradients differ from 1-rank" in check.detail, check.line()


def test_broken_setup_fails_with_the_reason(overrides, tmp_path, capsys):
    fake = tmp_path / "inception.pth"
    torch.save({"w": torch.zeros(2)}, fake)
    shard = next((tmp_path / "prepared" / "train").glob("shard-*.safetensors"))
    shard.unlink()
    code = bench(["doctor", *overrides, "eval.feature_network=inception",
                  f"eval.inception_weights={fake}", "--skip", "loss,ddp"])
    out = capsys.readouterr().out
    status = _lines(out)
    assert code == 1 and status["weights/inception"] == "FAIL" and status["data/prepared"] == "FAIL"
    assert "is not the 2015 Inception port's" in out and "shards missing" in out


def test_loss_check_catches_a_silent_precision_change(overrides, capsys, monkeypatch):
    # An fp32 step that secretly ran in bf16 moves the loss by ~1e-4 relative: above fp32's 1e-5.
    import bench.perf.training as training

    monkeypatch.setattr(training, "autocast", lambda device, precision: torch.autocast(
        device.type, dtype=torch.bfloat16) if precision == "fp32" else contextlib.nullcontext())
    code = bench(["doctor", *overrides, "train.precision=fp32", "--skip", "weights,data,ddp"])
    status = _lines(capsys.readouterr().out)
    assert code == 1 and status["loss/redi/cpu"] == "FAIL"


def test_reference_batch_is_checked_against_adms_sha256(overrides, tmp_path, capsys, monkeypatch):
    import numpy as np

    import bench.perf.doctor as doctor
    from bench.atomic import sha256_file

    reference = tmp_path / "VIRTUAL_imagenet256_labeled.npz"
    np.savez(reference, mu=np.zeros(3), sigma=np.eye(3))
    args = [*overrides, f"eval.reference={reference}", "--skip", "loss,data,ddp"]
    monkeypatch.setattr(doctor, "_adm_reference_sha256", lambda: "0" * 64)  # another file's hash
    assert bench(["doctor", *args]) == 1
    out = capsys.readouterr().out
    assert _lines(out)["weights/reference"] == "FAIL" and "is not ADM's" in out
    monkeypatch.setattr(doctor, "_adm_reference_sha256", lambda: sha256_file(reference))
    assert bench(["doctor", *args]) == 0
    assert "is ADM's reference batch" in capsys.readouterr().out


def test_a_hub_vae_that_fails_to_load_is_one_fail_line(capsys, monkeypatch):
    """vae.path as a Hub repo id: a cached VAE that fails to load (a damaged file) is one FAIL line
    naming the error, not a traceback; one the cache lacks is still skipped, one that loads passes."""
    import bench.perf.doctor as doctor
    from bench.prepare.encoders import EncoderError

    args = ["doctor", "vae.kind=diffusers", "vae.path=stabilityai/sd-vae-ft-ema",
            "--skip", "loss,ddp,data,throughput"]

    def damaged(cfg_vae):
        raise RuntimeError("Error while deserializing header: HeaderTooLarge")

    def not_cached(cfg_vae):
        raise EncoderError("not in the Hugging Face cache")

    monkeypatch.setattr(doctor, "load_vae", damaged)
    assert bench(args) == 1
    out = capsys.readouterr().out
    assert "FAIL weights/vae: RuntimeError: Error while deserializing header: HeaderTooLarge" in out.splitlines()
    assert _lines(out) == {"weights/vae": "FAIL", "weights/encoder": "SKIP", "weights/inception": "SKIP",
                           "weights/reference": "SKIP"}
    monkeypatch.setattr(doctor, "load_vae", not_cached)
    assert bench(args) == 0
    assert "is a Hugging Face repo id not in the local cache" in capsys.readouterr().out
    monkeypatch.setattr(doctor, "load_vae", lambda cfg_vae: None)
    assert bench(args) == 0
    assert _lines(capsys.readouterr().out)["weights/vae"] == "PASS"


def test_throughput_rows_land_where_the_dry_run_reads_them(tmp_path):
    # On a GPU node doctor runs this with device cuda; here the same rows on the CPU.
    from bench.perf.doctor import throughput_checks

    (check,) = throughput_checks(["redi"], "custom:2,32,2,1", 8, "embedded", str(tmp_path),
                                 device="cpu", extra=["--repeats", "1", "--warmup", "1",
                                                      "--min-repeat-seconds", "0"])
    assert check.status == "PASS", check.line()
    assert "images/s per cpu: redi" in check.detail and list(tmp_path.glob("*.jsonl"))
