"""The house rules, read from the code: the app reaches the core through one door, tabs are
rooms, and the core imports neither gradio nor plotly."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UI_FILES = sorted((ROOT / "ui").rglob("*.py"))
DOORS = {"hsr_core.pipeline", "hsr_core.config"}


def imports(path: Path) -> list[tuple[str, list[str], int]]:
    """``(module, names, line)`` of every import in a file, function-local ones included."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.module, [a.name for a in node.names], node.lineno))
    return out


def module_of(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def test_the_app_reaches_the_core_through_pipeline_and_config_only() -> None:
    wrong = []
    for path in [*UI_FILES, ROOT / "app.py"]:
        for module, names, line in imports(path):
            if module == "hsr_core":
                used = {f"hsr_core.{n}" for n in names}
            elif module.startswith("hsr_core"):
                used = {module}
            else:
                continue
            wrong += [f"{path.relative_to(ROOT)}:{line} {m}" for m in used - DOORS]
    assert not wrong, "ui/ may import only hsr_core.pipeline and hsr_core.config:\n" + "\n".join(
        wrong
    )


def test_the_door_re_exports_what_it_promises() -> None:
    from hsr_core import pipeline

    missing = [n for n in pipeline.__all__ if not hasattr(pipeline, n)]
    assert not missing and len(set(pipeline.__all__)) == len(pipeline.__all__)


def test_tabs_are_rooms_and_the_plumbing_imports_no_tab() -> None:
    problems = []
    for path in UI_FILES:
        me = module_of(path)
        for module, names, line in imports(path):
            if not module.startswith("ui"):
                continue
            where = f"{path.relative_to(ROOT)}:{line}"
            if me.startswith("ui.tabs.") and module.startswith("ui.tabs"):
                problems.append(f"{where}: a tab imports another tab ({module} {names})")
            plumbing = me in ("ui.events", "ui.public", "ui.session", "ui.workbench", "ui.figures")
            if plumbing and (module.startswith(("ui.tabs", "ui.layout")) or "layout" in names):
                problems.append(f"{where}: shared plumbing imports the page ({module})")
            private = [n for n in names if n.startswith("_")]
            if private:
                problems.append(f"{where}: private names of another file {private}")
    assert not problems, "\n".join(problems)


def test_every_tab_has_build_and_wire() -> None:
    from ui import layout

    assert [t.__name__.rsplit(".", 1)[-1] for t in layout.TABS] == [
        "header",
        "model",
        "attribute",
        "prune",
        "realign",
        "chat",
        "evaluate",
        "export",
        "localize",
    ]
    for tab in layout.TABS:
        assert callable(tab.build) and callable(tab.wire), tab.__name__


@pytest.mark.parametrize("blocked", [["gradio"], ["plotly"], ["gradio", "plotly"]])
def test_the_core_imports_without_gradio_or_plotly(blocked: list[str]) -> None:
    """Every module of hsr_core (and the command line) imports with the UI libraries blocked."""
    modules = sorted(
        module_of(p) for p in (ROOT / "hsr_core").glob("*.py") if p.name != "__init__.py"
    )
    code = (
        "import sys\n"
        + "".join(f"sys.modules[{name!r}] = None\n" for name in blocked)
        + "import importlib\n"
        + f"for m in {['hsr_core', *modules]!r}:\n    importlib.import_module(m)\n"
        + "from hsr_core.__main__ import build_parser\nbuild_parser().parse_args(['run', '--model', 'm', '--out', 'o'])\n"
        + "assert all(sys.modules.get(n) is None for n in "
        + repr(blocked)
        + ")\nprint('ok')\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr


def test_every_parser_refuses_abbreviated_options() -> None:
    """argparse's prefix matching turned ``--judge reference`` into ``--judge-model reference``;
    every command line of the project sets ``allow_abbrev=False``."""
    missing = []
    for folder in ("hsr_core", "scripts", "bench"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if (
                    isinstance(node, ast.Call)
                    and getattr(node.func, "attr", getattr(node.func, "id", None))
                    == "ArgumentParser"
                    and not any(
                        k.arg == "allow_abbrev"
                        and isinstance(k.value, ast.Constant)
                        and k.value.value is False
                        for k in node.keywords
                    )
                ):
                    missing.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not missing, missing
