"""`bench import-official`: a released (official-layout) checkpoint becomes a run folder that
`bench sample`, `bench eval` and `bench report` use like a trained run.

The checkpoint is written by the test from tests/official_reference.py, an independent
official-style network with random weights; the imported run's network must compute what that
network computes (float64, 1e-10: the two differ only in summation order) for both weight sets.
"""

from __future__ import annotations

import argparse
import json
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from fixtures_train import GRID, LATENT_CHANNELS, R_MAX, add_embedded_eval_assets, write_prepared
from official_reference import OfficialReDiSiT

from bench.cli import main as bench
from bench.compose import from_dict
from bench.train.checkpoint import verify_checkpoint

ATOL64 = 1e-10
STEP = 400


def make_official(seed: int = 0) -> OfficialReDiSiT:
    torch.manual_seed(seed)
    ref = OfficialReDiSiT(input_size=GRID, patch=2, latent_channels=LATENT_CHANNELS,
                          semantic_channels=R_MAX, width=64, depth=3, heads=4, num_classes=10,
                          learn_sigma=False, projector_dim=0, projector_hidden=32, repa_layer=2)
    with torch.no_grad():  # random everything: every weight must land in the right place
        for name, p in ref.named_parameters():
            if name != "pos_embed":
                p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()) if p.ndim > 1 else 0.1)
    return ref.eval()


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    root = tmp_path_factory.mktemp("official")
    prepared = add_embedded_eval_assets(write_prepared(root / "prepared"), classifier_epochs=1.0)
    ema, raw = make_official(0), make_official(1)
    ckpt = root / f"{STEP:07d}.pt"
    torch.save({"model": {f"module.{k}": v for k, v in raw.official_state_dict().items()},
                "ema": ema.official_state_dict(), "opt": {"state": {}, "param_groups": []},
                "args": argparse.Namespace(model="SiT-XL/2", pca_rank=R_MAX)}, ckpt)
    overrides = [f"data.prepared_dir={prepared}", "data.name=digits", f"output_root={root / 'runs'}",
                 "eval.sampler=euler", "eval.num_sampling_steps=2", "eval.num_samples=16",
                 "eval.batch_size=8"]
    assert bench(["import-official", str(ckpt), "--scale", "embedded", "--num-heads", "4",
                  *overrides]) == 0
    (run,) = (root / "runs" / "official").iterdir()
    return run, ema.double(), raw.double()


def test_run_folder_holds_the_config_the_weights_describe(imported):
    run, _, _ = imported
    cfg = from_dict(json.loads((run / "config.json").read_text()))
    assert (cfg.spec, cfg.model.size, cfg.model.hidden_size, cfg.model.depth, cfg.model.num_heads,
            cfg.model.patch_size, cfg.model.pca_rank, cfg.model.learn_sigma) == \
        ("redi", "custom", 64, 3, 4, 2, R_MAX, False)
    assert cfg.train.max_steps == STEP and (run / "DONE").is_file()
    meta = verify_checkpoint(run / "checkpoints" / f"{STEP:07d}")
    assert meta["state"]["precision"] == "fp32" and meta["state"]["imported"]
    record = json.loads((run / "imported.json").read_text())
    assert record["sets"] == ["ema", "model"] and record["args"]["model"] == "SiT-XL/2"
    # the folder is the config's own (bench train with this config finds the run finished)
    from bench.run_hash import run_hash
    assert meta["state"]["run_hash"] == run_hash(cfg) and run.name == f"redi-{run_hash(cfg)}"


@pytest.mark.parametrize("which", ["ema", "raw"])
def test_imported_network_computes_the_official_network(imported, which):
    from bench.evaluate.sampling import load_sampling_model, read_run_manifest

    run, ema, raw = imported
    cfg = from_dict(json.loads((run / "config.json").read_text()))
    model, _ = load_sampling_model(run, cfg, read_run_manifest(cfg), STEP, which == "ema",
                                   torch.device("cpu"))
    model = model.double()
    reference = ema if which == "ema" else raw
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, LATENT_CHANNELS, GRID, GRID, generator=g, dtype=torch.float64)
    z = 4.0 * torch.randn(3, R_MAX, GRID, GRID, generator=g, dtype=torch.float64)
    t, y = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64), torch.tensor([0, 3, 10])
    with torch.no_grad():
        official = reference(torch.cat([x, z], 1), t, y)
        out = model(x, t, y, z)
    torch.testing.assert_close(torch.cat([out.x, out.z], 1), official, atol=ATOL64, rtol=0)
    assert official.abs().max() > 0.5


def test_sample_eval_and_report_work_on_the_imported_run(imported, tmp_path, capsys):
    run, _, _ = imported
    assert bench(["sample", str(run), "--step", str(STEP), "--num-samples", "8",
                  "--no-progress"]) == 0
    assert bench(["eval", str(run), "--step", str(STEP), "--setting", "no_cfg", "--no-progress",
                  "eval.metrics=[fid]"]) == 0
    rows = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
    assert {r["metric"] for r in rows} >= {"fd_classifier"} and all(r["step"] == STEP for r in rows)
    assert bench(["report", "official", "--runs-root", str(run.parents[1]), "--out", str(tmp_path),
                  "--no-plots"]) == 0
    assert "SiT-tiny/2 w/ ReDi" in (tmp_path / "official" / "report.md").read_text()


def test_a_checkpoint_that_does_not_fit_is_one_clear_error(imported, tmp_path, capsys):
    run, _, _ = imported
    cfg = json.loads((run / "config.json").read_text())
    ckpt = tmp_path / "500.pt"
    torch.save({"ema": make_official(2).official_state_dict()}, ckpt)
    code = bench(["import-official", str(ckpt), "--scale", "embedded", "--num-heads", "4",
                  f"data.prepared_dir={cfg['data']['prepared_dir']}", "data.name=digits",
                  f"output_root={tmp_path}", "model.pca_rank=2"])
    err = capsys.readouterr().err
    assert code == 2 and "does not fit the run's config" in err and "model.pca_rank" in err
    code = bench(["import-official", str(tmp_path / "missing.pt")])
    assert code == 2 and "not found" in capsys.readouterr().err


def test_sample_sweep_draws_the_same_samples_under_each_value(imported, tmp_path):
    # Fig. 8's picture: rows = w_r, columns = the same label and starting noise in every row
    from PIL import Image

    from bench.evaluate.sweep import sweep_images

    run, _, _ = imported
    out = tmp_path / "figure8.png"
    assert bench(["sample-sweep", str(run), "--step", str(STEP), "--values", "1.0", "1.5",
                  "--num-samples", "4", "--out", str(out)]) == 0
    with Image.open(out) as image:
        image.verify()
    rows, labels = sweep_images(run, STEP, "eval.guidance.rg_scale", ["1.0", "1.5", "1.0"], 4)
    assert len(labels) == 4 and all(r.shape == rows[0].shape for r in rows)
    assert (rows[0] == rows[2]).all()      # same setting, same images: the noise is seeded
    assert (rows[0] != rows[1]).any()      # only the guidance changed between the rows


def test_grid_import_lands_in_the_grids_run_folder(imported, tmp_path):
    # `--grid readme_checkpoint` at full scale; here a tiny grid of the same shape
    from bench.launch import grids

    run, _, _ = imported
    cfg = json.loads((run / "config.json").read_text())
    (tmp_path / "grids").mkdir()
    (tmp_path / "grids" / "tiny_release.yaml").write_text(
        "name: tiny_release\ntitle: tiny\nregenerates: [readme_checkpoint]\n"
        f"base: [scale=embedded, data.name=digits, 'data.prepared_dir={cfg['data']['prepared_dir']}',"
        f" 'output_root={tmp_path / 'runs'}', model.size=custom, model.hidden_size=64, model.depth=3,"
        f" model.num_heads=4, model.patch_size=2, model.pca_rank={R_MAX}, encoder.pca_rank_max={R_MAX},"
        f" train.max_steps={STEP}, train.ckpt_every={STEP}]\n"
        "specs: [redi]\neval:\n  steps: [400]\n")
    ckpt = tmp_path / "release.pt"
    torch.save({"ema": make_official(0).official_state_dict()}, ckpt)
    assert bench(["import-official", str(ckpt), "--grid", "tiny_release",
                  "--grids-dir", str(tmp_path / "grids")]) == 0
    (cell,) = grids.expand(grids.load_grid("tiny_release", tmp_path / "grids"))
    assert (cell.run_dir / "DONE").is_file()
    assert json.loads((cell.run_dir / "imported.json").read_text())["sets"] == ["ema"]
