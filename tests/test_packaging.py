"""redi-bench installs like a library: a wheel built from this tree, installed (not editable) into
a folder of its own, runs from an unrelated working folder with everything that ships (grids,
specs, scales, cluster profiles, the paper's numbers) read from the installed package, a user
folder in the working folder still coming first, and `python -m bench` as the command.

The wheel is built offline (`--no-build-isolation`: hatchling comes with the `test` extra) and
installed with `--no-deps` (the dependencies are this environment's)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# slow: about 19 s on the 2-vCPU development machine (a wheel build and two interpreters).
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("hatchling") is None and not os.environ.get("REDI_BENCH_CI"),
                                 reason="hatchling is not installed (the `test` extra installs it)")]


def _run(args: list[str], cwd: Path, env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(site folder of the installed wheel, an unrelated working folder, the environment)."""
    root = tmp_path_factory.mktemp("packaging")
    wheels, site, work = root / "wheels", root / "site", root / "work"
    work.mkdir()
    build_env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # wherever this environment finds hatchling
    built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                  str(wheels), str(REPO)], cwd=root, env=build_env)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = wheels.glob("redi_bench-*.whl")
    done = _run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target",
                 str(site), str(wheel)], cwd=root, env=build_env)
    assert done.returncode == 0, done.stderr[-3000:]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "REDI_BENCH_PATH")}
    return site, work, {**env, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(site)}


def test_the_wheel_carries_what_ships_and_the_licence(installed):
    site, _, _ = installed
    shipped = site / "bench" / "_shipped"
    assert (shipped / "ablations" / "config.yaml").is_file()
    assert {p.stem for p in (shipped / "ablations" / "scale").glob("*.yaml")} == {"embedded", "paper"}
    assert (shipped / "ablations" / "grids" / "table1.yaml").is_file()
    assert {p.stem for p in (shipped / "profiles").glob("*.yaml")} >= {"example", "local", "local-slurm"}
    assert (shipped / "paper" / "table1.csv").is_file()
    (licence,) = site.glob("redi_bench-*.dist-info/licenses/LICENSE")
    assert "MIT License" in licence.read_text() and "the redi-bench authors" in licence.read_text()


def test_the_installed_command_runs_from_any_folder(installed):
    site, work, env = installed
    mine = work / "redi-bench" / "grids"
    mine.mkdir(parents=True)
    smoke = (site / "bench" / "_shipped" / "ablations" / "grids" / "smoke.yaml").read_text()
    (mine / "my_smoke.yaml").write_text(smoke.replace("name: smoke", "name: my_smoke"))
    usage = _run([sys.executable, "-m", "bench", "--help"], cwd=work, env=env)
    assert usage.returncode == 0 and "weights" in usage.stdout and "grid" in usage.stdout, usage.stderr
    script = textwrap.dedent(f"""
        import bench, bench.resources as r
        from bench.cli import main
        from bench.compose import load_config
        from bench.report.published import load_paper_numbers
        assert bench.__file__.startswith({str(site)!r}), bench.__file__
        assert r.source_root() is None and r.shipped("ablations").is_relative_to({str(site)!r})
        cfg = load_config(["scale=paper", "spec=repa"])
        assert (cfg.vae.kind, cfg.model.size, cfg.objective.lambda_repa) == ("diffusers", "XL/2", 0.5), cfg
        assert len(load_paper_numbers()) > 50
        assert main(["grid", "--list"]) == 0
        assert main(["grid", "my_smoke", "--list"]) == 0
        print("weights exit", main(["weights", "scale=paper"]))
    """)
    out = _run([sys.executable, "-c", script], cwd=work, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "table1" in out.stdout and "profiles: example, local, local-slurm" in out.stdout
    assert "my_smoke" in out.stdout and f"[from {(work / 'redi-bench').resolve()}]" in out.stdout
    assert "grid my_smoke:" in out.stdout  # the user's grid expands from the installed package
    assert "hf download stabilityai/sd-vae-ft-ema" in out.stdout and "weights exit 1" in out.stdout
