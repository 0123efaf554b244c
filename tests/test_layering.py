"""The house's layering rules (bench/README.md, "Layering rules"), checked against the code's imports.

Every import is read from the source with `ast`, function-local ones included, so a lazy import
cannot hide an arrow that points the wrong way.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PIPELINE = ("prepare", "train", "evaluate", "launch", "report")  # a wing may import the ones before it
BESIDE = ("perf", "demo", "rehearse")  # beside the pipeline: may import any wing, and nothing imports them
SHARED = ("config", "compose", "run_hash", "atomic", "runfolder", "metrics_log", "process_lanes", "resources", "site",
          "storage", "locks", "progress", "precision")
FRONT_DOOR = ("cli", "__main__")


def _modules(package: str) -> dict[str, Path]:
    root = REPO / package
    return {".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p
            for p in root.rglob("*.py")}


def _imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, imported module, imported names) of every import statement in the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module, [alias.name for alias in node.names]))
    return found


def _place(module: str) -> str:
    """'models', a wing name, a shared module's name, or 'cli'."""
    parts = module.split(".")
    return "models" if parts[0] == "models" else parts[1] if len(parts) > 1 else "bench"


def test_the_house_has_only_known_rooms():
    """A new top-level module or wing must be given a place in the rules before it lands."""
    known = set(PIPELINE) | set(BESIDE) | set(SHARED) | set(FRONT_DOOR) | {"bench"}
    assert {_place(m) for m in _modules("bench")} <= known


def _arrows():
    for module, path in {**_modules("bench"), **_modules("models")}.items():
        for line, target, names in _imports(path):
            if target.split(".")[0] in ("bench", "models"):
                # `from bench.train import checkpoint` imports the module bench.train.checkpoint
                yield module, f"{path.relative_to(REPO)}:{line}", target, names


def test_wings_import_only_earlier_wings_and_shared_modules():
    """Pipeline wings import earlier wings and shared modules. A wing beside the pipeline may import
    any pipeline wing and the BESIDE wings listed before it (demo takes its machine description
    from perf, never the reverse); no pipeline wing or shared module imports a BESIDE wing."""
    wrong = []
    for module, where, target, _names in _arrows():
        src, dst = _place(module), _place(target)
        if src == dst or dst in SHARED or dst in ("bench", "models") or src == "models":
            continue
        if src in PIPELINE and dst in PIPELINE and PIPELINE.index(dst) < PIPELINE.index(src):
            continue
        if src in FRONT_DOOR and dst in PIPELINE + BESIDE:
            continue
        if src in BESIDE and (dst in PIPELINE or (dst in BESIDE and BESIDE.index(dst) < BESIDE.index(src))):
            continue
        if src in FRONT_DOOR and dst in FRONT_DOOR:  # `python -m bench` is the `bench` command
            continue
        wrong.append(f"{where}: {module} -> {target}")
    assert not wrong, "imports against the pipeline's direction:\n" + "\n".join(wrong)


def test_shared_modules_import_no_wing():
    wrong = [f"{where}: {module} -> {target}" for module, where, target, _ in _arrows()
             if _place(module) in SHARED and _place(target) not in SHARED + ("bench", "models")]
    assert not wrong, "\n".join(wrong)


def test_report_never_imports_training_or_the_core():
    wrong = [f"{where}: {target}" for module, where, target, names in _arrows()
             if _place(module) == "report" and (_place(target) in ("train", "evaluate") or target.startswith("models"))]
    assert not wrong, "bench.report reads files only:\n" + "\n".join(wrong)


def test_nothing_imports_private_names_of_another_module():
    wrong = [f"{where}: {target} {name}" for module, where, target, names in _arrows()
             for name in names if name.startswith("_") and target != module]
    assert not wrong, "\n".join(wrong)


def test_models_imports_no_harness_and_touches_no_files():
    for path in _modules("models").values():
        for line, target, _ in _imports(path):
            assert not target.startswith("bench"), f"{path.name}:{line} imports {target}"
        source = path.read_text(encoding="utf-8")
        for call in ("open(", "torch.load(", "safe_open(", "load_file(", "read_text(", "read_bytes(",
                     "torch.save(", "save_file("):
            assert call not in source, f"models/{path.name} calls {call}: file I/O belongs to bench/"


@pytest.mark.parametrize("wing", PIPELINE + BESIDE)
def test_each_wing_names_its_modules(wing):
    """The package's __init__ docstring lists every module of the wing (its public face)."""
    init = REPO / "bench" / wing / "__init__.py"
    doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8"))) or ""
    modules = sorted(p.stem for p in init.parent.glob("*.py") if p.stem != "__init__")
    missing = [m for m in modules if f"`{m}`" not in doc]
    assert not missing, f"bench/{wing}/__init__.py does not name {missing}"


def test_importing_the_harness_leaves_the_environment_alone():
    """An import changes nothing outside its module: the `bench` command, not an import, sets
    HF_HUB_OFFLINE (bench.cli.main), so a program that imports the training step keeps its own."""
    import subprocess
    import sys

    code = ("import os; before = dict(os.environ); "
            "import bench.prepare.encoders, bench.train.step, bench.evaluate.features; "
            "print(sorted(set(os.environ.items()) ^ set(before.items())))")
    env = {k: v for k, v in __import__("os").environ.items() if k != "HF_HUB_OFFLINE"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=REPO, env=env, timeout=300).stdout
    assert out.strip() == "[]"


def test_the_bench_command_sets_hf_hub_offline_before_a_subcommand_runs(monkeypatch):
    import os

    from bench import cli

    seen = {}

    def probe(rest):
        seen["HF_HUB_OFFLINE"] = os.environ.get("HF_HUB_OFFLINE")
        return 0

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setitem(cli.SUBCOMMANDS, "probe", ("a subcommand that records its environment", "os:getcwd"))
    monkeypatch.setattr(cli, "_resolve", lambda target: probe)
    assert cli.main(["probe"]) == 0
    assert seen["HF_HUB_OFFLINE"] == "1"


FUNCTION_LINES = 60  # bench/README.md: every function reads top to bottom on one page


def test_every_function_fits_on_one_page():
    """No function (or method) of bench/ or models/ runs past FUNCTION_LINES lines from its `def` to
    its last line (docstring included): a longer one is split into named steps."""
    long = []
    for package in ("bench", "models"):
        for path in _modules(package).values():
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    lines = node.end_lineno - node.lineno + 1
                    if lines > FUNCTION_LINES:
                        long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "functions longer than a page:\n" + "\n".join(long)
