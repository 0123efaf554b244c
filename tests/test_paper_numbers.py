"""The published ReDi numbers in results/paper/ against an independent re-typing.

Every expected value below was typed by hand from the paper (arXiv 2504.16064v3: the results
tables, the ablations and the convergence claims of Fig. 2), not generated from the CSV files.
Values are compared with an absolute tolerance of 1e-9: both sides parse the same decimal literal, the finest
published digit is 0.01, so any typo differs by at least 0.01 and no correct entry differs at all.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pandas as pd
import pytest

from bench.report.published import (
    KEY_COLUMNS,
    PAPER_COLUMNS,
    PaperNumbersError,
    available_tables,
    load_convergence_claims,
    load_paper_numbers,
)

TOL = 1e-9  # see module docstring: identical decimal literals, published resolution >= 0.01
K, M = 1_000, 1_000_000
PAPER_TABLES = {
    "table1", "table2", "table3", "table4", "table5", "table6", "table9", "table10",
    "figure6", "figure7", "readme_checkpoint",
}


@pytest.fixture(scope="module")
def paper() -> pd.DataFrame:
    return load_paper_numbers()


def _one(df: pd.DataFrame, table: str, metric: str, **filters) -> float:
    """The single value matching table/metric/filters; None in a filter means 'empty'."""
    mask = (df["table"] == table) & (df["metric"] == metric)
    for column, wanted in filters.items():
        mask &= df[column].isna() if wanted is None else (df[column] == wanted)
    hits = df.loc[mask, "value"]
    assert len(hits) == 1, f"{table} {metric} {filters}: expected 1 row, found {len(hits)}"
    return float(hits.iloc[0])


def _check(df: pd.DataFrame, table: str, metric: str, expected: float, **filters) -> None:
    got = _one(df, table, metric, **filters)
    assert math.isclose(got, expected, rel_tol=0.0, abs_tol=TOL), (table, metric, filters, got)


# ---------------------------------------------------------------- structure


def test_every_table_is_loaded(paper: pd.DataFrame) -> None:
    assert set(available_tables()) == PAPER_TABLES
    assert set(paper["table"]) == PAPER_TABLES
    for name in PAPER_TABLES:
        single = load_paper_numbers(name)
        assert set(single["table"]) == {name}
        assert len(single) == (paper["table"] == name).sum()


def test_number_of_published_numbers_per_table(paper: pd.DataFrame) -> None:
    # Counted from the reference: cells per table (Table 2 has 14 rows x 5 metrics minus 8 "–").
    expected = {
        "table1": 18 * 2, "table2": 14 * 5 - 8, "table3": 8 * 2, "table4": 4 * 2, "table5": 3,
        "table6": 3 * 3, "table9": 7 * 5, "table10": 8 * 5, "figure7": 8, "figure6": 2,
        "readme_checkpoint": 5,
    }
    assert paper["table"].value_counts().to_dict() == expected


def test_columns_dtypes_and_finiteness(paper: pd.DataFrame) -> None:
    assert tuple(paper.columns) == PAPER_COLUMNS
    for column in ("pca_rank", "iterations", "epochs"):
        assert str(paper[column].dtype) == "Int64", column
    for column in ("value", "cfg_scale", "rg_scale"):
        assert paper[column].dtype == "float64", column
    assert paper["conditional"].dtype == bool
    assert paper["value"].map(math.isfinite).all()
    assert (paper["iterations"].notna() | paper["epochs"].notna()).all()
    assert (paper["source"] != "").all()


def test_keys_are_unique(paper: pd.DataFrame) -> None:
    counts = paper.groupby(list(KEY_COLUMNS), dropna=False).size()
    assert counts.max() == 1, counts[counts > 1]


# ---------------------------------------------------------------- values, typed independently

TABLE1 = {  # (model, method, iterations): (params in M, FID)
    ("DiT-L/2", "latent_only", 400 * K): (458, 23.2),
    ("DiT-L/2", "repa", 400 * K): (458, 15.6),
    ("DiT-L/2", "redi", 400 * K): (458, 10.5),
    ("SiT-L/2", "latent_only", 400 * K): (458, 18.5),
    ("SiT-L/2", "repa", 400 * K): (458, 9.7),
    ("SiT-L/2", "redi", 400 * K): (458, 9.4),
    ("DiT-XL/2", "latent_only", 400 * K): (675, 19.5),
    ("DiT-XL/2", "repa", 400 * K): (675, 12.3),
    ("DiT-XL/2", "latent_only", 7 * M): (675, 9.6),
    ("DiT-XL/2", "repa", 850 * K): (675, 9.6),
    ("DiT-XL/2", "redi", 400 * K): (675, 8.7),
    ("SiT-XL/2", "latent_only", 400 * K): (675, 17.2),
    ("SiT-XL/2", "repa", 400 * K): (675, 7.9),
    ("SiT-XL/2", "redi", 400 * K): (675, 7.5),
    ("SiT-XL/2", "latent_only", 7 * M): (675, 8.3),
    ("SiT-XL/2", "repa", 4 * M): (675, 5.9),
    ("SiT-XL/2", "redi", 700 * K): (675, 5.6),
    ("SiT-XL/2", "redi", 4 * M): (675, 3.3),
}

TABLE2 = {  # (model, method, epochs): (FID, sFID, IS, Pre, Rec); None = "–"
    ("VAR", "VAR", 350): (1.80, None, 365.4, 0.83, 0.57),
    ("MagViTv2", "MagViTv2", 1080): (1.78, None, 319.4, 0.83, 0.57),
    ("MAR", "MAR", 800): (1.55, None, 303.7, 0.81, 0.62),
    ("LDM", "LDM", 200): (3.60, None, 247.7, 0.87, 0.48),
    ("U-ViT-H/2", "U-ViT", 240): (2.29, 5.68, 263.9, 0.82, 0.57),
    ("DiT-XL/2", "latent_only", 1400): (2.27, 4.60, 278.2, 0.83, 0.57),
    ("MaskDiT", "MaskDiT", 1600): (2.28, 5.67, 276.6, 0.80, 0.61),
    ("SD-DiT", "SD-DiT", 480): (3.23, None, None, None, None),
    ("SiT-XL/2", "latent_only", 1400): (2.06, 4.50, 270.3, 0.82, 0.59),
    ("FasterDiT", "FasterDiT", 400): (2.03, 4.63, 264.0, 0.81, 0.60),
    ("MDT", "MDT", 1300): (1.79, 4.57, 283.0, 0.81, 0.61),
    ("SiT-XL/2", "repa", 800): (1.80, 4.50, 284.0, 0.81, 0.61),
    ("SiT-XL/2", "redi", 350): (1.72, 4.68, 278.7, 0.77, 0.63),
    ("SiT-XL/2", "redi", 800): (1.61, 4.66, 295.1, 0.78, 0.64),
}
FIVE = ("fid", "sfid", "is", "precision", "recall")

TABLE3 = {  # (model, method, conditional): (params, FID)
    ("DiT-B/2", "latent_only", True): (130, 43.5),
    ("DiT-B/2", "latent_only", False): (130, 69.3),
    ("DiT-B/2", "redi", False): (130, 51.7),
    ("DiT-B/2", "redi_rg", False): (130, 47.3),
    ("DiT-XL/2", "latent_only", True): (675, 19.5),
    ("DiT-XL/2", "latent_only", False): (675, 44.6),
    ("DiT-XL/2", "redi", False): (675, 25.1),
    ("DiT-XL/2", "redi_rg", False): (675, 22.6),
}

TABLE4 = {  # (model, method): (params, FID)
    ("DiT-B/2", "redi"): (130, 25.7),
    ("DiT-B/2", "redi_rg"): (130, 20.2),
    ("DiT-XL/2", "redi"): (675, 8.7),
    ("DiT-XL/2", "redi_rg"): (675, 5.9),
}

TABLE5 = {("repa", 4 * M): 5.9, ("redi_repa", 350 * K): 5.9, ("redi_repa", 1 * M): 3.5}

TABLE6 = {  # (method, fusion): (tokens, throughput img/s, FID)
    ("latent_only", "none"): (256, 4.52, 43.5),
    ("redi", "merged"): (256, 4.51, 25.7),
    ("redi", "separate"): (512, 2.26, 24.7),
}

TABLE9 = {  # (method, iterations): (FID, sFID, IS, Prec, Rec)
    ("latent_only", 7 * M): (8.3, 6.3, 131.7, 0.68, 0.67),
    ("redi", 50 * K): (56.1, 18.9, 23.8, 0.44, 0.47),
    ("redi", 100 * K): (23.1, 5.9, 61.5, 0.64, 0.57),
    ("redi", 200 * K): (12.6, 5.7, 97.3, 0.69, 0.61),
    ("redi", 300 * K): (9.7, 5.3, 117.3, 0.71, 0.62),
    ("redi", 400 * K): (7.5, 5.1, 129.5, 0.72, 0.62),
    ("redi", 4 * M): (3.3, 4.8, 188.9, 0.74, 0.68),
}

TABLE10 = {
    ("repa", 400 * K): (7.9, 5.1, 122.6, 0.70, 0.65),
    ("repa", 4 * M): (5.9, 5.7, 157.8, 0.70, 0.69),
    ("redi_repa", 50 * K): (44.8, 18.7, 32.8, 0.50, 0.49),
    ("redi_repa", 100 * K): (15.2, 5.6, 85.3, 0.68, 0.59),
    ("redi_repa", 200 * K): (8.3, 5.2, 122.3, 0.71, 0.61),
    ("redi_repa", 300 * K): (6.3, 5.1, 140.6, 0.73, 0.62),
    ("redi_repa", 400 * K): (5.3, 4.9, 149.8, 0.74, 0.63),
    ("redi_repa", 1 * M): (3.5, 4.64, 177.9, 0.75, 0.69),
}

FIGURE7 = {None: 43.0, 1: 31.9, 2: 29.2, 4: 27.0, 8: 25.7, 12: 27.5, 16: 29.1, 32: 36.9}


def test_table1(paper: pd.DataFrame) -> None:
    for (model, method, iters), (params, fid) in TABLE1.items():
        _check(paper, "table1", "fid", fid, model=model, method=method, iterations=iters)
        _check(paper, "table1", "params_m", params, model=model, method=method, iterations=iters)


def test_table2(paper: pd.DataFrame) -> None:
    for (model, method, epochs), values in TABLE2.items():
        for metric, expected in zip(FIVE, values):
            if expected is None:  # "–" cells have no row at all
                mask = (paper["table"] == "table2") & (paper["model"] == model)
                assert not (mask & (paper["metric"] == metric)).any(), (model, metric)
            else:
                _check(paper, "table2", metric, expected, model=model, method=method, epochs=epochs)
    redi = paper[(paper["table"] == "table2") & (paper["method"] == "redi")]
    assert (redi["cfg"] == "latent").all() and (redi["cfg_scale"] == 2.4).all()


def test_table3_unconditional(paper: pd.DataFrame) -> None:
    for (model, method, cond), (params, fid) in TABLE3.items():
        _check(paper, "table3", "fid", fid, model=model, method=method, conditional=cond)
        _check(paper, "table3", "params_m", params, model=model, method=method, conditional=cond)
    # The unconditional "w/ ReDi" rows do not state p_drop: the CSV must say it is assumed.
    redi = paper[(paper["table"] == "table3") & (paper["method"] == "redi")]
    assert len(redi) == 4 and redi["note"].str.contains("assumed").all()
    # RG scales from the paper's section 4.1: 1.5 for B, 1.1 for XL.
    _check(paper, "table3", "fid", 47.3, model="DiT-B/2", method="redi_rg", rg_scale=1.5)
    _check(paper, "table3", "fid", 22.6, model="DiT-XL/2", method="redi_rg", rg_scale=1.1)


def test_table4_representation_guidance(paper: pd.DataFrame) -> None:
    for (model, method), (params, fid) in TABLE4.items():
        _check(paper, "table4", "fid", fid, model=model, method=method, iterations=400 * K)
        _check(paper, "table4", "params_m", params, model=model, method=method)


def test_table5_and_figure6(paper: pd.DataFrame) -> None:
    for (method, iters), fid in TABLE5.items():
        _check(paper, "table5", "fid", fid, model="SiT-XL/2", method=method, iterations=iters)
    _check(paper, "figure6", "fid", 2.39, method="redi", cfg="latent", iterations=400 * K)
    _check(paper, "figure6", "fid", 2.86, method="redi", cfg="all", iterations=400 * K)


def test_table6_fusion(paper: pd.DataFrame) -> None:
    for (method, fusion), (tokens, throughput, fid) in TABLE6.items():
        _check(paper, "table6", "tokens", tokens, method=method, fusion=fusion)
        _check(paper, "table6", "throughput_img_s", throughput, method=method, fusion=fusion)
        _check(paper, "table6", "fid", fid, model="DiT-B/2", method=method, fusion=fusion)


@pytest.mark.parametrize("name,data", [("table9", TABLE9), ("table10", TABLE10)])
def test_tables_9_and_10(paper: pd.DataFrame, name: str, data: dict) -> None:
    for (method, iters), values in data.items():
        for metric, expected in zip(FIVE, values):
            _check(paper, name, metric, expected, model="SiT-XL/2", method=method, iterations=iters)


def test_table9_row_at_400k(paper: pd.DataFrame) -> None:
    row = {"fid": 7.5, "sfid": 5.1, "is": 129.5, "precision": 0.72, "recall": 0.62}
    for metric, expected in row.items():
        _check(paper, "table9", metric, expected, method="redi", iterations=400 * K)


def test_figure7_pca_rank(paper: pd.DataFrame) -> None:
    for rank, fid in FIGURE7.items():
        method = "latent_only" if rank is None else "redi"
        _check(paper, "figure7", "fid", fid, model="DiT-B/2", method=method, pca_rank=rank)


def test_readme_checkpoint_is_flagged(paper: pd.DataFrame) -> None:
    readme = paper[paper["table"] == "readme_checkpoint"]
    assert readme["note"].str.contains("swapped").all()
    assert readme["note"].str.contains("NOT a paper number").all()
    _check(paper, "readme_checkpoint", "fid", 1.64, epochs=600)
    _check(paper, "readme_checkpoint", "precision", 0.65, epochs=600)
    _check(paper, "readme_checkpoint", "recall", 0.77, epochs=600)


# ---------------------------------------------------------------- consistency stated in the reference


def test_cross_table_consistency(paper: pd.DataFrame) -> None:
    def fid(table: str, **f) -> float:
        return _one(paper, table, "fid", **f)

    # Table 4 "w/ ReDi" equals Table 1 (8.7) and Table 6 (25.7).
    assert fid("table4", model="DiT-XL/2", method="redi") == fid(
        "table1", model="DiT-XL/2", method="redi", iterations=400 * K) == 8.7
    assert fid("table4", model="DiT-B/2", method="redi") == fid(
        "table6", method="redi", fusion="merged") == fid("figure7", pca_rank=8) == 25.7
    # Table 9 at 400K equals Table 1's SiT-XL/2 ReDi at 400K (7.5); same at 4M (3.3) and 7M.
    for iters, expected in ((400 * K, 7.5), (4 * M, 3.3)):
        assert fid("table9", method="redi", iterations=iters) == fid(
            "table1", model="SiT-XL/2", method="redi", iterations=iters) == expected
    assert fid("table9", method="latent_only") == fid(
        "table1", model="SiT-XL/2", method="latent_only", iterations=7 * M) == 8.3
    # Table 10 repeats Table 5 and the REPA rows of Table 1.
    for method, iters in (("redi_repa", 1 * M), ("repa", 4 * M)):
        assert fid("table10", method=method, iterations=iters) == fid(
            "table5", method=method, iterations=iters)
    assert fid("table10", method="repa", iterations=400 * K) == fid(
        "table1", model="SiT-XL/2", method="repa", iterations=400 * K) == 7.9
    # Table 3's conditional references equal Table 6 / Table 1 baselines.
    assert fid("table3", model="DiT-B/2", conditional=True) == fid(
        "table6", method="latent_only") == 43.5
    assert fid("table3", model="DiT-XL/2", conditional=True) == fid(
        "table1", model="DiT-XL/2", method="latent_only", iterations=400 * K) == 19.5


def test_convergence_claims_match_tables(paper: pd.DataFrame) -> None:
    claims = load_convergence_claims().set_index("claim")
    assert claims["speedup_stated"].to_dict() == {
        "x23_dit": 23.0, "x23_sit": 23.0, "x6": 6.0, "x11": 11.0}
    # Ratios 7M/400K = 17.5, 4M/700K = 5.714..., 4M/350K = 11.428...; 1e-12 is float rounding.
    for claim, ratio in (("x23_dit", 17.5), ("x23_sit", 17.5), ("x6", 4 / 0.7), ("x11", 4 / 0.35)):
        assert math.isclose(claims.loc[claim, "speedup_from_tables"], ratio, rel_tol=1e-12)
    for claim, row in claims.iterrows():
        table = "table5" if row["method"] == "redi_repa" else "table1"
        assert _one(paper, table, "fid", model=row["model"], method=row["method"],
                    iterations=row["method_iterations"]) == row["method_fid"], claim
        assert _one(paper, "table1", "fid", model=row["model"], method=row["baseline_method"],
                    iterations=row["baseline_iterations"]) == row["baseline_fid"], claim
        assert row["method_fid"] <= row["baseline_fid"], claim


# ---------------------------------------------------------------- bad input fails clearly


@pytest.fixture()
def copy_dir(tmp_path: Path) -> Path:
    source = Path(__file__).resolve().parents[1] / "results" / "paper"
    for name in ("table5.csv", "convergence_claims.csv"):
        shutil.copy(source / name, tmp_path / name)
    return tmp_path


def _corrupt(folder: Path, old: str, new: str) -> None:
    path = folder / "table5.csv"
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


@pytest.mark.parametrize(
    "old,new,message",
    [
        ("350000", "350K", "not a plain non-negative integer"),
        (",redi_repa,", ",redi+repa,", "is not one of"),
        (",fid,5.9,", ",fid,nan,", "not finite"),
        (",fid,5.9,", ",fid,abc,", "not a number"),
        ("table,model", "tabel,model", "header mismatch"),
        (",sde-em-250,", ",euler,", "sampler"),
    ],
)
def test_malformed_csv_raises(copy_dir: Path, old: str, new: str, message: str) -> None:
    _corrupt(copy_dir, old, new)
    with pytest.raises(PaperNumbersError, match=message):
        load_paper_numbers(directory=copy_dir)


def test_duplicate_row_raises(copy_dir: Path) -> None:
    path = copy_dir / "table5.csv"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines + [lines[1]]) + "\n")
    with pytest.raises(PaperNumbersError, match="more than once"):
        load_paper_numbers(directory=copy_dir)


def test_bad_table_names_raise(copy_dir: Path) -> None:
    with pytest.raises(PaperNumbersError, match="unknown paper table 'table7'"):
        load_paper_numbers("table7", directory=copy_dir)
    with pytest.raises(PaperNumbersError, match="load_convergence_claims"):
        load_paper_numbers("convergence_claims", directory=copy_dir)
    with pytest.raises(PaperNumbersError, match="does not exist"):
        load_paper_numbers(directory=copy_dir / "missing")
    assert isinstance(PaperNumbersError("x"), ValueError)
