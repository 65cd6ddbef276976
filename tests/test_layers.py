"""The house's layers: a module imports only from its own package or the ones below it, never from above.

core < compress < bench < search < retrain          the stages, lowest first
core < reports                                       reports read run directories' records only
slimnas.recipes, slimnas.cli, slimnas.config         above every stage: the commands
slimnas.models                                       above every stage: the import that registers per-layer students
"""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["core", "compress", "bench", "search", "retrain"]  # lowest first
ALLOWED = {stage: set(STAGES[: i + 1]) for i, stage in enumerate(STAGES)} | {"reports": {"core", "reports"}}
TOP = ("recipes", "cli", "config", "models")  # slimnas.recipes.*, slimnas.cli, slimnas.config, slimnas.models


def package_of(module: str) -> str:
    """core, compress, ..., reports, or top for the commands."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ALLOWED else "top"


def imports() -> list[tuple[str, str]]:
    """(importing module, imported slimnas module) for every import in the package's sources."""
    edges = []
    for folder in [*ALLOWED, "slimnas"]:
        for path in sorted((ROOT / folder).rglob("*.py")):
            relative = path.relative_to(ROOT / folder)
            if folder == "slimnas" and relative.parts[0] in ALLOWED:
                continue  # the links to the stage folders: read once, as the folder itself
            prefix = "slimnas" if folder == "slimnas" else f"slimnas.{folder}"
            module = ".".join([prefix, *relative.with_suffix("").parts]).removesuffix(".__init__")
            for node in ast.walk(ast.parse(path.read_text())):
                names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
                names += [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
                edges += [(module, name) for name in names if name.startswith("slimnas")]
    return edges


def test_no_module_imports_from_a_package_above_its_own():
    edges = imports()
    assert len(edges) > 100
    upward = [
        (module, imported)
        for module, imported in edges
        if package_of(module) != "top" and package_of(imported) not in ALLOWED[package_of(module)]
    ]
    assert upward == []


def test_the_commands_sit_above_every_stage_and_the_package_links_to_the_stage_folders():
    edges = imports()
    assert all(module.split(".")[1] in TOP for module, _ in edges if package_of(module) == "top")
    assert any(module == "slimnas.recipes.pipeline" and package_of(imported) == "reports" for module, imported in edges)
    for folder in [*ALLOWED, "conf"]:  # slimnas/compress -> ../compress: one tree that path-reading tools follow
        link = ROOT / "slimnas" / folder
        assert link.is_symlink() and link.resolve() == ROOT / folder


HEAVY = ("torch", "transformers", "optuna", "lm_eval", "pandas", "matplotlib", "scipy")


def imported(code: str, names: tuple[str, ...]) -> set[str]:
    """Which of these modules a fresh interpreter has imported after running `code`."""
    probe = f"import sys\n{code}\nprint(' '.join(sorted(set(sys.modules) & set(sys.argv[1:]))))"
    done = subprocess.run([sys.executable, "-c", probe, *names], capture_output=True, text=True, check=True)
    return set(done.stdout.split())


def test_reports_read_records_without_torch_optuna_or_the_stages():
    code = "import slimnas.reports.page, slimnas.reports.chain, slimnas.reports.runs"
    stages = ("slimnas.compress", "slimnas.bench", "slimnas.search", "slimnas.retrain")
    assert imported(code, (*HEAVY, *stages)) <= {"pandas", "matplotlib", "scipy"}


def test_composing_and_checking_a_command_imports_nothing_heavy():
    """The configuration is composed and checked before any recipe: bad settings fail in about a second."""
    for command, overrides in [("export", "['model=x']"), ("report", "['run_dirs=[x]']"), ("search", "[]")]:
        code = f"from slimnas.config import check, compose\ncheck(compose('{command}', {overrides}))"
        assert imported(code, HEAVY) == set(), command


def test_a_bare_import_of_slimnas_loads_nothing_heavy_and_slimnas_models_registers_the_per_layer_students():
    assert imported("import slimnas", HEAVY) == set()
    code = "import slimnas.models\nfrom transformers import AutoConfig\nAutoConfig.for_model('slimnas_qwen3')"
    assert {"torch", "transformers"} <= imported(code, HEAVY)
