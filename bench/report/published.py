"""The ReDi paper's published numbers (arXiv 2504.16064v3) as tidy pandas tables.

The numbers live as hand-typed CSV files in ``results/paper/`` at the repository root, shipped
inside the wheel as package data (bench.resources): one file per paper table or figure; the schema
and every known inconsistency are described in ``results/paper/README.md``. The report layer puts
them in a ``paper`` column beside measured numbers, so this module is strict: a malformed file
fails loudly with the file, line, column and the fix, instead of silently producing a wrong comparison.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pandas as pd

from bench import resources

PAPER_DIR = resources.shipped("paper")

PAPER_COLUMNS: tuple[str, ...] = (
    "table", "model", "method", "transport", "size", "conditional", "fusion", "pca_rank",
    "iterations", "epochs", "cfg", "cfg_scale", "rg_scale", "sampler", "metric", "value",
    "source", "note",
)
# Everything that identifies a number; value/source/note are the payload.
KEY_COLUMNS: tuple[str, ...] = PAPER_COLUMNS[:15]
INT_COLUMNS: tuple[str, ...] = ("pca_rank", "iterations", "epochs")
OPTIONAL_FLOAT_COLUMNS: tuple[str, ...] = ("cfg_scale", "rg_scale")
NONEMPTY_COLUMNS: tuple[str, ...] = (
    "table", "model", "method", "transport", "conditional", "fusion", "cfg", "metric", "value",
    "source",
)

# The harness's own specs (ablations/) ...
CORE_METHODS = frozenset({"latent_only", "repa", "redi", "redi_repa", "redi_rg"})
# ... and the external systems that appear only in Table 2 (named as in the paper).
EXTERNAL_METHODS = frozenset(
    {"VAR", "MagViTv2", "MAR", "LDM", "U-ViT", "MaskDiT", "SD-DiT", "FasterDiT", "MDT"}
)
VOCABULARY: dict[str, frozenset[str]] = {
    "method": CORE_METHODS | EXTERNAL_METHODS,
    "transport": frozenset({"flow", "ddpm", "other"}),
    "size": frozenset({"", "B", "L", "XL"}),
    "conditional": frozenset({"true", "false"}),
    "fusion": frozenset({"merged", "separate", "none"}),
    "cfg": frozenset({"none", "latent", "all"}),
    "sampler": frozenset({"", "ddpm-250", "sde-em-250"}),
    "metric": frozenset(
        {"fid", "sfid", "is", "precision", "recall", "throughput_img_s", "params_m", "tokens"}
    ),
}

CLAIMS_TABLE = "convergence_claims"
CLAIM_COLUMNS: tuple[str, ...] = (
    "claim", "figure", "model", "method", "baseline_method", "baseline_iterations",
    "baseline_fid", "method_iterations", "method_fid", "speedup_stated", "evidence", "source",
    "note",
)

_INT_PATTERN = re.compile(r"^[0-9]+$")


class PaperNumbersError(ValueError):
    """A paper-numbers CSV is missing, malformed, or asked for under a wrong name."""


def _resolve_dir(directory: str | Path | None) -> Path:
    folder = PAPER_DIR if directory is None else Path(directory)
    if not folder.is_dir():
        raise PaperNumbersError(
            f"paper-numbers folder {folder} does not exist; it should hold the CSV files "
            "typed from the ReDi paper (results/paper/ at the repository root)"
        )
    return folder


def available_tables(directory: str | Path | None = None) -> list[str]:
    """Names of the paper tables/figures present as CSV (file stems, sorted), without the claims."""
    folder = _resolve_dir(directory)
    return sorted(p.stem for p in folder.glob("*.csv") if p.stem != CLAIMS_TABLE)


def _read_raw(path: Path, expected: tuple[str, ...]) -> pd.DataFrame:
    """Read every cell as a string (no NA guessing), then check the header exactly."""
    try:
        raw = pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise PaperNumbersError(f"{path}: not a readable CSV file ({err})") from err
    missing = [c for c in expected if c not in raw.columns]
    extra = [c for c in raw.columns if c not in expected]
    if missing or extra:
        raise PaperNumbersError(
            f"{path}: header mismatch; missing columns {missing}, unexpected columns {extra}. "
            f"The header must be exactly: {','.join(expected)}"
        )
    return raw[list(expected)]


def _where(path: Path, index: int, column: str) -> str:
    # +2: one for the header line, one because CSV line numbers start at 1.
    return f"{path.name} line {index + 2}, column '{column}'"


def _parse_int(text: str, where: str, *, required: bool) -> int | None:
    if text == "":
        if required:
            raise PaperNumbersError(f"{where}: empty, but an integer is required")
        return None
    if not _INT_PATTERN.match(text):
        raise PaperNumbersError(
            f"{where}: {text!r} is not a plain non-negative integer; write e.g. 400000, not 400K"
        )
    return int(text)


def _parse_float(text: str, where: str, *, required: bool) -> float:
    if text == "":
        if required:
            raise PaperNumbersError(f"{where}: empty, but a number is required")
        return math.nan
    try:
        number = float(text)
    except ValueError:
        raise PaperNumbersError(f"{where}: {text!r} is not a number") from None
    if not math.isfinite(number):
        raise PaperNumbersError(f"{where}: {text!r} is not finite; omit the row instead")
    return number


def _check_row(row: pd.Series, path: Path, index: int) -> None:
    """Vocabulary and cross-column rules for one raw (string) row."""
    for column in NONEMPTY_COLUMNS:
        if row[column] == "":
            raise PaperNumbersError(f"{_where(path, index, column)}: must not be empty")
    for column, allowed in VOCABULARY.items():
        if row[column] not in allowed:
            raise PaperNumbersError(
                f"{_where(path, index, column)}: {row[column]!r} is not one of {sorted(allowed)}"
            )
    if row["table"] != path.stem:
        raise PaperNumbersError(
            f"{_where(path, index, 'table')}: {row['table']!r} differs from the file name; "
            f"rows of {path.name} must say table={path.stem!r}"
        )
    if row["iterations"] == "" and row["epochs"] == "":
        raise PaperNumbersError(
            f"{_where(path, index, 'iterations')}: give iterations or epochs (or both)"
        )
    uses_semantics = row["method"].startswith("redi")
    if uses_semantics != (row["fusion"] != "none"):
        raise PaperNumbersError(
            f"{_where(path, index, 'fusion')}: method {row['method']!r} needs fusion "
            f"{'merged/separate' if uses_semantics else 'none'}, got {row['fusion']!r}"
        )
    if uses_semantics != (row["pca_rank"] != ""):
        raise PaperNumbersError(
            f"{_where(path, index, 'pca_rank')}: give pca_rank for redi* methods and only for them"
        )
    if (row["method"] == "redi_rg") != (row["rg_scale"] != ""):
        raise PaperNumbersError(
            f"{_where(path, index, 'rg_scale')}: give rg_scale for redi_rg rows and only for them"
        )
    if row["cfg"] == "none" and row["cfg_scale"] != "":
        raise PaperNumbersError(
            f"{_where(path, index, 'cfg_scale')}: cfg is 'none' but cfg_scale is set"
        )


def _parse_table(path: Path) -> pd.DataFrame:
    raw = _read_raw(path, PAPER_COLUMNS)
    if raw.empty:
        raise PaperNumbersError(f"{path}: has a header but no rows")
    ints: dict[str, list[int | None]] = {c: [] for c in INT_COLUMNS}
    floats: dict[str, list[float]] = {c: [] for c in (*OPTIONAL_FLOAT_COLUMNS, "value")}
    for index, row in raw.iterrows():
        _check_row(row, path, index)
        for column in INT_COLUMNS:
            ints[column].append(_parse_int(row[column], _where(path, index, column), required=False))
        for column in OPTIONAL_FLOAT_COLUMNS:
            floats[column].append(
                _parse_float(row[column], _where(path, index, column), required=False)
            )
        value = _parse_float(row["value"], _where(path, index, "value"), required=True)
        if value < 0 or (row["metric"] in ("precision", "recall") and value > 1):
            raise PaperNumbersError(
                f"{_where(path, index, 'value')}: {value} is out of range for {row['metric']}"
            )
        floats["value"].append(value)
    table = raw.copy()
    for column, values in ints.items():
        table[column] = pd.array(values, dtype="Int64")
    for column, values in floats.items():
        table[column] = pd.Series(values, index=table.index, dtype="float64")
    table["conditional"] = raw["conditional"] == "true"
    return table


def _check_unique(table: pd.DataFrame) -> None:
    duplicated = table.duplicated(subset=list(KEY_COLUMNS), keep=False)
    if duplicated.any():
        shown = table.loc[duplicated, list(KEY_COLUMNS)].head(6).to_string(index=False)
        raise PaperNumbersError(
            "the same (table, model, method, setting, metric) key appears more than once; "
            f"each number must be typed exactly once:\n{shown}"
        )


def load_paper_numbers(
    table: str | None = None, *, directory: str | Path | None = None
) -> pd.DataFrame:
    """Load the paper's published numbers as one tidy DataFrame.

    Args:
        table: a file stem such as ``"table1"`` or ``"figure7"`` (see ``available_tables()``), or
            ``None`` for every table, including ``readme_checkpoint`` (the official README's
            600-epoch row, flagged in its ``note``; it is not a paper number).
        directory: folder of CSV files; defaults to ``results/paper`` at the repository root.

    Returns:
        One row per (model, setting, iteration/epoch, metric) with the columns
        ``PAPER_COLUMNS``: ``pca_rank``/``iterations``/``epochs`` as nullable ``Int64``,
        ``value``/``cfg_scale``/``rg_scale`` as float64 (NaN when not applicable),
        ``conditional`` as bool, everything else as strings ("" when not applicable).

    Raises:
        PaperNumbersError (a ValueError): unknown table name, missing folder, bad header,
        value outside the controlled vocabulary, non-numeric or non-finite number, or a
        duplicated key.
    """
    names = available_tables(directory)
    if table is not None:
        if not isinstance(table, str):
            raise PaperNumbersError(f"table must be a string such as 'table1', got {table!r}")
        if table == CLAIMS_TABLE:
            raise PaperNumbersError(
                "convergence_claims has its own schema; use load_convergence_claims()"
            )
        if table not in names:
            raise PaperNumbersError(f"unknown paper table {table!r}; available: {names}")
        names = [table]
    if not names:
        raise PaperNumbersError(f"no paper-number CSV files in {_resolve_dir(directory)}")
    folder = _resolve_dir(directory)
    frames = [_parse_table(folder / f"{name}.csv") for name in names]
    numbers = pd.concat(frames, ignore_index=True)
    _check_unique(numbers)
    return numbers


def load_convergence_claims(*, directory: str | Path | None = None) -> pd.DataFrame:
    """Load the Fig. 2 speed-up claims (x23, x6, x11) with the tabulated evidence behind them.

    Each row says: the paper states ``speedup_stated``; the baseline ``baseline_method`` reaches
    ``baseline_fid`` at ``baseline_iterations``; ``method`` reaches ``method_fid`` (no worse) at
    ``method_iterations`` (first tabulated point). The added column ``speedup_from_tables`` is
    ``baseline_iterations / method_iterations``, a lower bound from the tables only; the paper
    reads its factors off the curves and gives no formula.
    """
    path = _resolve_dir(directory) / f"{CLAIMS_TABLE}.csv"
    if not path.is_file():
        raise PaperNumbersError(f"{path} is missing; it holds the Fig. 2 speed-up claims")
    raw = _read_raw(path, CLAIM_COLUMNS)
    claims = raw.copy()
    for column in ("baseline_iterations", "method_iterations"):
        claims[column] = pd.array(
            [_parse_int(v, _where(path, i, column), required=True) for i, v in raw[column].items()],
            dtype="Int64",
        )
    for column in ("baseline_fid", "method_fid", "speedup_stated"):
        claims[column] = [
            _parse_float(v, _where(path, i, column), required=True) for i, v in raw[column].items()
        ]
    for column in ("method", "baseline_method"):
        for i, v in raw[column].items():
            if v not in CORE_METHODS:
                raise PaperNumbersError(
                    f"{_where(path, i, column)}: {v!r} is not one of {sorted(CORE_METHODS)}"
                )
    if raw["claim"].duplicated().any() or (raw["claim"] == "").any():
        raise PaperNumbersError(f"{path}: claim names must be non-empty and unique")
    claims["speedup_from_tables"] = (
        claims["baseline_iterations"].astype("float64") / claims["method_iterations"].astype("float64")
    )
    return claims
