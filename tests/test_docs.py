"""The project's documents are self-contained: every file or folder they point at is in the
repository, and nothing points at notes a user does not have (the developers' design notes and
reference files lived outside the repository; what users need from them is in docs/)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXT_SUFFIXES = {".md", ".py", ".yaml", ".yml", ".sh", ".toml", ".txt", ".cfg", ".csv", ""}
# Words that only make sense to someone holding the developers' private notes. Joined from parts,
# so that this file itself never names them (a scanner for dangling references would flag it).
_NOTES, _SHARED = "DESIGN" + ".md", "shared" + "/"
OUTSIDE = (_NOTES, _SHARED + "reference", "../" + "shared", "/work/" + "shared", "style" + "_anchors",
           "embedded" + "_feasibility", "redi" + "_method.md", "local" + "_slurm.md", "offline" + "_assets",
           "peers" + "_and_pitfalls")
# A path: folders then a file with a document or code suffix, or a folder of the repository.
PATH = re.compile(r"(?<![\w./@~-])((?:\.\.?/)*(?:[\w.-]+/)*[\w.-]+(?:\.(?:md|py|yaml|yml|sh|toml|txt)\b|/))")
TOP = ("bench/", "models/", "tests/", "ablations/", "slurm/", "docs/", ".ci/", "results/paper/",
       "results/readme/")
# Named on purpose although not in this repository, with the reason.
NOT_HERE = {
    "report.md": "written by `bench report` into its output folder",
    "site.yaml": "the user's own site file on the search path (docs/cluster.md), never checked in",
    "transport/path.py": "a file of the SiT repository, named as the source of a convention",
    "transport/__init__.py": "a file of the official ReDi/SiT code that `bench perf --official` imports",
    "transport/integrators.py": "a file of the official ReDi/SiT code that `bench perf --official` stands in for",
    "evaluations/evaluator.py": "ADM's evaluator in openai/guided-diffusion, the reference the metrics follow",
    "utils/util_convert_inception_weights.py": "torch-fidelity's converter of the 2015 Inception graph",
    "bench/_shipped/": "the wheel's copy of ablations/, slurm/profiles/ and results/paper/ (pyproject.toml)",
}


def tracked_files() -> list[str]:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "ls-files"], capture_output=True, text=True,
                             check=True, timeout=60).stdout.split()
    except (OSError, subprocess.CalledProcessError):  # an exported tree without .git
        skip = {".git", ".venv", "results/runs", "results/prepared", "results/demo"}
        out = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*") if p.is_file()
               and not any(str(p.relative_to(ROOT)).startswith(s) for s in skip)]
    return [f for f in out if Path(f).suffix in TEXT_SUFFIXES and (ROOT / f).is_file()]


def dangling_references(name: str, text: str, tracked: set[str]) -> list[str]:
    """Every reference in `text` (the file `name`) to something not in `tracked` (repository paths)."""
    folders = {str(p) for f in tracked for p in Path(f).parents}
    names = {Path(f).name for f in tracked}
    line_of = lambda index: text.count("\n", 0, index) + 1
    bad = []
    for word in OUTSIDE:
        for hit in re.finditer(re.escape(word), text):
            bad.append((hit.start(), f"{name}:{line_of(hit.start())}: {word} (not part of the repository)"))
    for hit in PATH.finditer(text):
        ref = hit.group(1)
        if not (ref.endswith(".md") or ref.startswith(TOP)
                or ("/" in ref and ref.endswith((".py", ".yaml", ".yml", ".sh", ".toml")))):
            continue  # names like SiT-XL/2 or loss/latent are not paths
        if any(c in ref for c in "<>{}*") or any(part.isupper() for part in re.split(r"[/.]", ref)):
            continue  # templates and placeholders: results/runs/<grid>, ablations/grids/NAME.yaml
        if ref in NOT_HERE or ref.endswith(tuple("/" + k for k in NOT_HERE)):
            continue
        plain = ref.removeprefix("./").rstrip("/")
        if any(c in tracked or c in folders for c in (plain, str(Path(name).parent / plain))):
            continue
        if "/" not in plain and plain in names:
            continue  # a bare file name that exists somewhere in the repository
        bad.append((hit.start(), f"{name}:{line_of(hit.start())}: {ref} does not exist in the repository"))
    return [message for _, message in sorted(bad)]


def test_every_referenced_file_exists_in_the_repository():
    files = tracked_files()
    assert len(files) > 50 and "README.md" in files and "docs/method.md" in files
    tracked = set(files) | set(subprocess.run(["git", "-C", str(ROOT), "ls-files"], capture_output=True,
                                              text=True).stdout.split())
    bad = []
    for name in files:
        if name == "tests/test_docs.py":
            continue  # its own examples of what is caught
        try:
            bad += dangling_references(name, (ROOT / name).read_text(encoding="utf-8"), tracked)
        except UnicodeDecodeError:
            continue
    assert bad == []


def test_the_checker_catches_what_it_must():
    """A test that cannot fail is no test: each kind of dangling reference is caught, and the
    kinds of text that only look like paths are not."""
    text = (f"See `docs/nowhere.md`, bench/launch/missing.py and the {_NOTES} notes;\n"
            "fine: `docs/method.md`, bench/launch/grids.py, ablations/grids/NAME.yaml, SiT-XL/2, "
            "results/runs/<grid>/, README.md.\n")
    tracked = {"docs/method.md", "bench/launch/grids.py", "README.md"}
    assert dangling_references("docs/probe.md", text, tracked) == [
        "docs/probe.md:1: docs/nowhere.md does not exist in the repository",
        "docs/probe.md:1: bench/launch/missing.py does not exist in the repository",
        f"docs/probe.md:1: {_NOTES} (not part of the repository)"]


# ------------------------------------------------------------------------------------------------
# The README is a front page: short, its commands real, its numbers quoted from records.

README = (ROOT / "README.md").read_text(encoding="utf-8")
MAX_README_WORDS = 1200


def readme_commands(text: str = README) -> list[str]:
    """Every `bench SUBCOMMAND` the text names (not `redi-bench`, not the `bench/` folder)."""
    return sorted(set(re.findall(r"(?<![\w/-])bench ([a-z][a-z-]*)", text)))


def test_the_readme_is_a_front_page():
    words = len(README.split())
    assert words <= MAX_README_WORDS, f"README.md has {words} words; the front page holds at most {MAX_README_WORDS}"
    dated = re.findall(r"\b20\d\d-\d\d-\d\d\b", README)
    assert not dated, f"README.md carries dates {dated}: measurement records belong in docs/ or results/"
    for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", README):
        assert (ROOT / image).is_file(), f"README.md shows {image}, which is not in the repository"


def test_every_command_the_readme_names_exists():
    """`make demo` and `make test` are Makefile targets; every `bench X` is a subcommand of bench.cli
    and its `--help` runs (one line of usage at least, exit 0)."""
    from bench.cli import SUBCOMMANDS, main

    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    for target in ("demo", "test"):
        assert f"make {target}" in README and re.search(rf"^{target}:", makefile, re.M), target
    named = readme_commands()
    assert {"demo", "prepare", "grid", "status", "report", "train"} <= set(named)
    unknown = [name for name in named if name not in SUBCOMMANDS]
    assert not unknown, f"README.md names bench subcommands that bench/cli.py lacks: {unknown}"
    for name in named:
        try:
            code = main([name, "--help"])
        except SystemExit as done:  # argparse ends --help this way
            code = done.code
        assert code in (0, None), f"bench {name} --help exited {code}"


def test_the_command_finder_sees_what_it_must():
    text = "pip install redi-bench   # x\n`bench/` and bench demo, `bench grid NAME`, bench rehearse\n"
    assert readme_commands(text) == ["demo", "grid", "rehearse"]


def test_the_readme_quotes_the_demo_summary_as_recorded():
    """The demo's table in the README is a verbatim excerpt of results/readme/summary.md, and every
    interval the README cites is one the summary prints."""
    summary = (ROOT / "results" / "readme" / "summary.md").read_text(encoding="utf-8")
    block = README.split("## What the demo prints", 1)[1].split("```", 2)[1]
    lines = [line for line in block.splitlines() if line.strip()]
    assert len(lines) >= 4 and all(line in summary.splitlines() for line in lines), lines
    # The confirmation's intervals are quoted from its own write-up, every other one from the summary.
    confirm = (ROOT / "results" / "studies" / "embedded" / "confirm" / "README.md").read_text(encoding="utf-8")
    confirm = confirm.replace("\u2212", "-")  # the write-up prints a true minus sign
    for interval in re.findall(r"interval (\[[-+]?[\d.]+, [-+]?[\d.]+\])", README):
        assert f"interval {interval}" in summary or interval in confirm, interval
    for quoted in re.findall(r"(-?[\d.]+ \[-?[\d.]+, -?[\d.]+\])", README.split("## What it shows", 1)[1]):
        assert quoted in confirm, quoted


def test_the_demo_timing_table_is_generated_from_the_records():
    """docs/demo.md's first-run table is exactly what bench.demo.timings makes of results/readme/."""
    from bench.demo.timings import BEGIN, DOC, END, table, with_table

    document = DOC.read_text(encoding="utf-8")
    assert with_table(document, table()) == document, "run `python -m bench.demo.timings --write`"
    assert document.count(BEGIN) == document.count(END) == 1


def test_the_timing_table_and_the_demo_line_come_from_a_record(tmp_path):
    import json

    from bench.demo.timings import measured_elsewhere, table

    record = {"date": "2030-01-02T03:04:05+00:00", "total_s": 600.0, "measure_s": 12.0, "prepare_s": 108.0,
              "train_s": 240.0, "eval_s": 210.0, "report_s": 30.0, "machine": {"cpu": "Some CPU", "cores": 4},
              "cells": 9, "estimate": {"prepare_s": 60.0, "train_s": 120.0, "eval_s": 120.0, "calibration_s": 12.0}}
    # the same call recorded before measure_s existed: its report_s held the up-front measurement
    older = {k: v for k, v in record.items() if k != "measure_s"} | {"report_s": 42.0}
    (tmp_path / "inv.jsonl").write_text("{}\n" + json.dumps(record) + "\n")
    (tmp_path / "old.jsonl").write_text(json.dumps(older) + "\n")
    entry = {"kernels": "AVX2 (x)", "commit": "abc1234", "rg_steps": "600 only", "load": "quiet"}
    (tmp_path / "first-runs.json").write_text(json.dumps({"runs": [
        {"record": "inv.jsonl", "line": 2, **entry, "cited_by_demo": True},
        {"record": "old.jsonl", "line": 1, **entry, "cited_by_demo": False}]}))
    row = ("| Some CPU | AVX2 (x) | 9 | 2030-01-02 03:04 | abc1234 | 600 only | **10.0** | 0.2 | 1.8 | 4.0 | 3.5 | "
           "0.5 | 5.0 |")
    assert table(tmp_path).splitlines()[2:] == [row, row]
    assert measured_elsewhere(tmp_path) == (
        "a first run took 10.0 min on Some CPU, 4 cores, CPU kernels AVX2, quiet, 2030-01-02 (prepare 1.8, "
        "training 4.0, evaluation 3.5 min) (docs/demo.md)")
    assert measured_elsewhere(tmp_path / "nowhere") is None and table(tmp_path / "nowhere").count("\n") == 1
