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
