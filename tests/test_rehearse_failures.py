"""`bench rehearse` when a stage fails: one error naming the command, and rehearsal.json still
records what ran (the end-to-end run is tests/test_rehearse.py)."""

from __future__ import annotations

import json
import os

import pytest

from bench.rehearse import run


def test_a_failing_stage_is_named_and_recorded(tmp_path, monkeypatch):
    # The folder without its files: `bench weights` finds them missing and exits 1.
    monkeypatch.setattr(run.assets, "write_all", lambda folder: {})
    monkeypatch.delenv("REDI_BENCH_PATH", raising=False)
    cwd = os.getcwd()
    with pytest.raises(run.RehearsalError, match=r"`bench weights scale=paper --no-verify` exited with 1"):
        run.rehearse(tmp_path / "work", ["--cluster", "local-slurm"], timeout_s=60, say=lambda text: None)
    assert os.getcwd() == cwd and "REDI_BENCH_PATH" not in os.environ  # restored
    record = json.loads((tmp_path / "work" / "rehearsal.json").read_text())
    assert record["failed"].startswith("`bench weights") and record["export"] is None
    assert [s["exit"] for s in record["steps"]] == [0, 1]
    assert (tmp_path / "work" / "redi-bench" / "site.yaml").is_file()
    assert (tmp_path / "work" / "redi-bench" / "grids" / "table1.yaml").is_file()


def test_the_rehearsal_grid_is_table1_on_the_paper_scale(tmp_path, monkeypatch):
    from bench.launch.grids import expand, load_grid

    grid_file = tmp_path / "table1.yaml"
    grid_file.write_text(run.GRID)
    grid = load_grid(str(grid_file))
    cells = expand(grid)
    assert {c.name for c in cells} == {f"{s}-seed={k}" for s in ("latent_only", "repa", "redi") for k in (0, 1)}
    for cell in cells:
        assert "scale=paper" in cell.overrides and cell.cfg.vae.kind == "diffusers"
        assert cell.cfg.encoder.kind == "dinov2" and cell.cfg.encoder.variant == "vitb14_reg"
        assert cell.cfg.eval.feature_network == "inception" and cell.cfg.eval.sampler == "sde"
        assert cell.cfg.eval.expected_reference == "adm-imagenet256" and cell.cfg.data.image_size == 256
