"""Where the demo's Fashion-MNIST comes from (bench.prepare.fetch, `bench demo --data-root`), and the
summary's speed-up lines for a setting evaluated at one step. No network: every fetch here goes
through a stand-in for urlopen that serves the installed Debian files or fails as offline."""

from __future__ import annotations

import gzip
import io
import shutil
import urllib.error
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from bench import cli
from bench.config import DataConfig
from bench.prepare import fetch
from bench.prepare.sources import DatasetError, fashion_mnist_available, open_split

DEBIAN = Path("/usr/share/datasets/fashion-mnist")
needs_debian = pytest.mark.skipif(not fashion_mnist_available(), reason="dataset-fashion-mnist not installed")


@pytest.fixture
def nowhere(tmp_path, monkeypatch):
    """A machine without Debian's package and with an empty cache; returns the cache folder."""
    monkeypatch.setattr(fetch, "FASHION_MNIST_DIR", str(tmp_path / "no-debian"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "redi-bench" / "fashion-mnist"


class Response(io.BytesIO):
    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.headers = {"Content-Length": str(len(data))}


def serve(files: dict[str, bytes], urls: list):
    def opener(url, timeout):
        urls.append(url)
        return Response(files[url.rsplit("/", 1)[1]])
    return opener


@needs_debian
def test_data_root_is_read_and_a_missing_file_is_named(tmp_path):
    folder = tmp_path / "fmnist"
    folder.mkdir()
    for name in fetch.FASHION_MNIST_CONTENT_SHA256:
        shutil.copyfile(DEBIAN / name, folder / name)
    root = fetch.fashion_mnist_root(str(folder))
    assert root == str(folder.resolve())
    test = open_split(DataConfig(name="fashion_mnist", root=root), "test")
    assert len(test) == 10_000 and test.images([0]).shape == (1, 3, 32, 32)
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetError, match=r"--data-root .*: t10k-labels-idx1-ubyte.gz not found"):
        fetch.fashion_mnist_root(str(folder))


def test_offline_is_one_line_naming_both_ways_and_leaves_nothing(nowhere, monkeypatch):
    def offline(url, timeout):
        raise urllib.error.URLError("Temporary failure in name resolution")
    monkeypatch.setattr(fetch.urllib.request, "urlopen", offline)
    with pytest.raises(fetch.FetchError) as caught:
        fetch.fashion_mnist_root(None)
    message = str(caught.value)
    assert "\n" not in message and "name resolution" in message
    assert "apt-get install dataset-fashion-mnist" in message and "--data-root DIR" in message
    assert not nowhere.exists() or list(nowhere.iterdir()) == []  # no partial file, no temporary


@needs_debian
def test_fetch_fills_the_cache_with_checked_files_and_a_progress_line(nowhere, capsys):
    files = {name: (DEBIAN / name).read_bytes() for name in fetch.FASHION_MNIST_CONTENT_SHA256}
    urls = []
    fetch.fetch_all(nowhere, opener=serve(files, urls))
    assert sorted(p.name for p in nowhere.iterdir()) == sorted(files)
    assert urls == [fetch.FASHION_MNIST_URL + name for name in fetch.FASHION_MNIST_CONTENT_SHA256]
    err = capsys.readouterr().err
    assert "fetching train-images-idx3-ubyte.gz" in err and "(100%)" in err
    fetch.fetch_all(nowhere, opener=serve({}, urls))  # complete: nothing fetched again
    assert len(urls) == 4


def test_a_download_with_the_wrong_content_is_not_kept(nowhere):
    name = "t10k-labels-idx1-ubyte.gz"
    wrong = {name: gzip.compress(b"not the labels")}
    with pytest.raises(fetch.FetchError, match="SHA-256"):
        fetch.fetch_file(fetch.FASHION_MNIST_URL + name, nowhere / name,
                         fetch.FASHION_MNIST_CONTENT_SHA256[name], opener=serve(wrong, []))
    assert list(nowhere.iterdir()) == []


def test_bench_demo_data_root_errors_are_one_line(tmp_path, capsys):
    places = ["--out", str(tmp_path / "out"), "--runs-root", str(tmp_path / "runs"),
              "--prepared-dir", str(tmp_path / "prepared")]
    assert cli.main(["demo", "--data-root", str(tmp_path / "empty"), *places]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bench demo: error: --data-root") and "\n" not in err
    assert cli.main(["demo", "--quick", "--data-root", str(tmp_path), *places]) == 2
    assert "--quick runs on scikit-learn's digits" in capsys.readouterr().err


def test_the_data_root_reaches_every_cell_of_the_grid(tmp_path):
    from dataclasses import replace

    from bench.demo.plan import make_plan
    from bench.launch.grids import expand, load_grid

    plan = replace(make_plan(False, str(tmp_path / "o"), str(tmp_path / "r"), str(tmp_path / "p")),
                   data_root=str(tmp_path / "fmnist"))
    assert plan.data.root == str(tmp_path / "fmnist")
    cells = expand(load_grid("demo"), plan.overrides)
    assert cells and {c.cfg.data.root for c in cells} == {str(tmp_path / "fmnist")}


def test_a_setting_evaluated_at_one_step_gets_no_speedup_factor():
    from bench.demo.output import FD, speedup_lines

    rows = pd.DataFrame([("latent_only", "plain", "no guidance", 300, 68.6),
                         ("latent_only", "plain", "no guidance", 600, 40.6),
                         ("redi_rg", "rg1.5", "RG w_r=1.5", 600, 35.7), ("repa", "cfg2", "CFG w=2", 300, 50.0),
                         ("repa", "cfg2", "CFG w=2", 600, 30.0)], columns=["spec", "setting", "sampling", "step", FD])
    report = SimpleNamespace(speedups=[], conditions=pd.DataFrame({"spec": ["latent_only", "redi_rg", "repa"],
                                                                   "condition": ["SiT", "ReDi", "REPA"]}))

    def paired(p_holm: float) -> pd.DataFrame:  # bench.report.tables.paired_table's rows at 600
        return pd.DataFrame({"setting": ["rg1.5", "cfg2"], "metric": [FD, FD], "step": [600, 600],
                             "method": ["ReDi", "REPA"], "baseline": ["SiT", "SiT"],
                             "baseline_setting": ["plain", "plain"], "diff_mean": [-4.9, -10.6],
                             "diff_low": [-6.0, -12.0], "diff_high": [-3.8, -9.2], "n_pairs": [3, 3],
                             "p_holm": [0.001, p_holm], "family_size": [4, 4]})

    one, two = speedup_lines(report, rows, "latent_only", paired(0.001))
    assert one.startswith("[RG w_r=1.5 against no guidance] ReDi + RG w_r=1.5 vs SiT's final fd_classifier "
                          "40.6 (at 600): ReDi + RG w_r=1.5 evaluated at 600 only (fd_classifier 35.7), "
                          "no speed-up factor from a single evaluated step; at 600: ReDi + RG w_r=1.5 is "
                          "better than SiT")  # a shown difference, but one point gives no factor
    assert "x sooner" in two  # two evaluated steps and a difference shown after Holm: the factor stands
    _, unshown = speedup_lines(report, rows, "latent_only", paired(0.2))
    assert "sooner" not in unshown and "no difference shown after the correction for 4" in unshown
