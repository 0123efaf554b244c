"""Every grid's header says which paper table or figure it regenerates and which of its settings are
assumptions because the paper does not state them (ablations/README.md)."""

from __future__ import annotations

import re

import pytest

from bench.launch.grids import GRIDS_DIR, list_grids, load_grid


def _header(name: str) -> str:
    lines = (GRIDS_DIR / f"{name}.yaml").read_text(encoding="utf-8").splitlines()
    return "\n".join(line for line in lines[: next(i for i, text in enumerate(lines)
                                                    if text.startswith("name:"))])


def _printed(table_id: str) -> str:
    """'table5' -> 'Table 5', 'figure2' -> 'Figure 2', 'readme_checkpoint' -> 'README'."""
    match = re.fullmatch(r"(table|figure)(\d+)", table_id)
    return f"{match.group(1).capitalize()} {match.group(2)}" if match else "README"


@pytest.mark.parametrize("name", [n for n in list_grids() if load_grid(n).regenerates])
def test_header_names_the_table_and_the_assumptions(name):
    header = _header(name)
    for table in load_grid(name).regenerates:
        assert _printed(table) in header, (name, table)
    assert "# Assumed (the paper does not state them):" in header, name
    assert re.search(r"# Assumed .*\n#   - \S", header), name  # at least one listed assumption


def test_table2_and_figure8_grids_exist():
    assert {"table2", "figure8", "readme_checkpoint"} <= set(list_grids())
    assert "Figure 8" in _header("figure8") and "bench sample-sweep" in _header("figure8")
