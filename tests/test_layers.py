"""The import graph: a module imports only from its own package or the ones below it, never from above."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["compress", "bench", "search", "reports"]  # lowest first; the slimnas/ modules sit above all four


def layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else len(LAYERS)


def imports() -> list[tuple[str, str]]:
    """(importing module, imported slimnas module) for every import in the package's sources."""
    edges = []
    for folder in [*LAYERS, "slimnas"]:
        for path in sorted((ROOT / folder).rglob("*.py")):
            relative = path.relative_to(ROOT / folder).with_suffix("")
            prefix = "slimnas" if folder == "slimnas" else f"slimnas.{folder}"
            module = ".".join([prefix, *relative.parts]).removesuffix(".__init__")
            for node in ast.walk(ast.parse(path.read_text())):
                names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
                names += [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
                edges += [(module, name) for name in names if name.startswith("slimnas")]
    return edges


def test_no_module_imports_from_a_package_above_its_own():
    edges = imports()
    assert len(edges) > 100
    upward = [(module, imported) for module, imported in edges if layer(imported) > layer(module)]
    assert upward == []


def test_the_cli_pipeline_and_benchmarks_that_chain_stages_sit_above_them():
    edges = imports()
    for module in ("slimnas.cli", "slimnas.pipeline", "slimnas.baselines", "slimnas.config"):
        assert layer(module) == len(LAYERS)
    assert any(module == "slimnas.pipeline" and layer(imported) == 3 for module, imported in edges)  # uses reports
