"""Report: a grid's run folders as the paper's tables, plots and speed-ups. Reads only files.

- `summary`:     `bench report`: `gather` (tidy tables), `summarize` (a `Report`), `main`
- `tidy_tables`: the `Gathered` tables and the `Report` the other modules render
- `cell_table`:  the cells table (`CellTable`): seed means per setting, metric, group, condition, step
- `vocabulary`:  shared vocabulary: metric names and labels, provenance fields, `ReportError`
- `conditions`:  conditions (spec + varying settings) and provenance groups
- `stats`:       seed means with 95% t-intervals and the speed-up (`mean_ci95`, `speedup`); paired
                 differences, their p and Holm's step-down (`paired_comparisons`, `holm_adjust`)
- `noise`:       the evaluation noise split into checkpoints and samplings (`split_variance`)
- `wording`:     the one wording of a paired difference (`describe_difference`)
- `speedups`:    which speed-up factors a report states (`license_speedups`): only where the paired
                 difference at the baseline's step survives the Holm correction
- `published`:   the paper's numbers from `results/paper/*.csv`: `load_paper_numbers`
- `paper_match`: the paper's number beside a measured one, or why it is not comparable
- `comparability`: every setting the paper's numbers depend on, and which of them differ
- `tables`:      Markdown, LaTeX and CSV output: `render_markdown`, `write_report`
- `plots`:       convergence and loss plots: `plot_convergence`, `plot_losses`
"""
