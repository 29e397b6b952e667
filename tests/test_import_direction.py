"""Imports go one way: cluster may import trainer and rollout, trainer may import rollout, rollout
imports neither (function-level imports included), so each layer can be used without the ones above."""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FORBIDDEN = {"rollout": ("switchkd.trainer", "switchkd.cluster"), "trainer": ("switchkd.cluster",)}


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in ``path``, at any depth; ``from switchkd import x`` gives switchkd.x."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def test_layers_import_downwards_only():
    bad = []
    for package, forbidden in FORBIDDEN.items():
        for path in sorted((REPO / package).rglob("*.py")):
            for line, module in imported_modules(path):
                if any(module == f or module.startswith(f + ".") for f in forbidden):
                    bad.append(f"{path.relative_to(REPO)}:{line}: imports {module}")
    assert not bad, "imports against the layer direction:\n" + "\n".join(bad)


def test_the_check_sees_function_level_imports(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from switchkd import cluster\n    import switchkd.trainer.worker\n")
    assert imported_modules(source) == [(2, "switchkd.cluster"), (3, "switchkd.trainer.worker")]
