"""The package's import structure: imports point down the pipeline, no file imports itself back through
others, and no private name crosses a package. Run it alone: ``pytest tests/test_architecture.py``."""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

import spinediff

ROOT = Path(spinediff.__file__).parent
#: Packages (and top-level modules) from the bottom of the pipeline to the top; an import may point to the same
#: layer or below. documentation/architecture.md explains the layers.
LAYERS = [
    {"version", "errors", "paths", "io", "tasks", "utilities", "metrics"},
    {"datasets"},
    {"registration", "networks", "diffusion"},
    {"planning"},
    {"prediction"},  # the prediction core shared by the trainers' final validation and `spinediff predict`
    {"training"},
    {"run"},
    {"inference"},
    {"evaluation"},
    {"experiments"},
    {"cli", "__main__", "spinediff"},  # the command (also `python -m spinediff`), and the top-level API
    # (spinediff/__init__.py) that imports every layer
]
LEVEL = {name: level for level, names in enumerate(LAYERS) for name in names}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def imports() -> dict[str, list[tuple[str, str]]]:
    """module → [(imported module, imported name or '')], every import statement, also inside functions."""
    found: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for path in sorted(ROOT.rglob("*.py")):
        module = module_name(path)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("spinediff"):
                for alias in node.names:
                    submodule = f"{node.module}.{alias.name}"
                    is_module = (ROOT.parent / (submodule.replace(".", "/") + ".py")).is_file()
                    found[module].append((submodule, "") if is_module else (node.module, alias.name))
            elif isinstance(node, ast.ImportFrom) and node.level > 0:
                found[module].append(("<relative>", ""))
            elif isinstance(node, ast.Import):
                found[module] += [(alias.name, "") for alias in node.names if alias.name.startswith("spinediff")]
    return found


def test_every_package_is_placed_in_a_layer():
    packages = {package_of(module_name(path)) for path in ROOT.rglob("*.py")}
    assert packages <= set(LEVEL), f"place {sorted(packages - set(LEVEL))} in LAYERS (and in architecture.md)"


def test_imports_point_down_the_pipeline():
    upward = [f"{module} imports {target} ({package_of(module)} is below {package_of(target)})"
              for module, targets in imports().items() for target, _ in targets
              if target != "<relative>" and LEVEL[package_of(target)] > LEVEL[package_of(module)]]
    assert not upward, "\n".join(upward)


def test_no_module_imports_itself_back():
    graph = {module: {target for target, _ in targets} for module, targets in imports().items()}

    def reachable(start: str) -> set[str]:
        seen, stack = set(), [start]
        while stack:
            for nxt in graph.get(stack.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append(nxt)
        return seen

    cycles = sorted(f"{a} -> {b} -> ... -> {a}" for a in graph for b in graph[a] if a != b and a in reachable(b))
    assert not cycles, "\n".join(cycles)


def test_no_private_name_crosses_a_package_and_no_relative_imports():
    crossing = [f"{module} imports {name} from {target}" for module, targets in imports().items()
                for target, name in targets
                if name.startswith("_") and not name.startswith("__") and target != "<relative>"
                and package_of(target) != package_of(module)]
    relative = [module for module, targets in imports().items() if ("<relative>", "") in targets]
    assert not crossing and not relative, "\n".join(crossing + relative)


TASK_NAMES = {"segmentation", "translation", "generation"}


def task_name_comparisons() -> list[str]:
    """``x == "segmentation"``, ``x in ("translation", ...)`` and ``{"segmentation": ...}[x]`` outside tasks.py."""
    def names(node: ast.AST) -> set[str]:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return {node.value}
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return {e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)}
        if isinstance(node, ast.Dict):
            return {k.value for k in node.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)}
        return set()

    found = []
    for path in sorted(ROOT.rglob("*.py")):
        if path.name == "tasks.py" and path.parent == ROOT:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Compare):
                compared = set().union(*(names(n) for n in (node.left, *node.comparators)))
            elif isinstance(node, ast.Subscript) and isinstance(node.value, ast.Dict):
                compared = names(node.value)
            else:
                continue
            if compared & TASK_NAMES:
                found.append(f"{path.relative_to(ROOT.parent)}:{node.lineno}")
    return found


def test_tasks_are_classes_not_compared_names():
    """What differs between tasks is asked of the task object (spinediff/tasks.py), never by comparing names."""
    found = task_name_comparisons()
    assert not found, "task-name comparisons outside spinediff/tasks.py:\n" + "\n".join(found)


#: One home per fact: the module that alone may define it (``documentation/architecture.md``).
FOLD_SEED_HOME = "spinediff/utilities/seeds.py"


def fold_seed_formulas() -> list[str]:
    """Products with a fold (``seed + 1000 * fold``) outside :data:`FOLD_SEED_HOME`: a second fold-seed formula.
    Training and prediction must draw a fold's noise from one formula (``utilities.seeds.fold_seed``)."""
    def mentions_fold(node: ast.AST) -> bool:
        return any((isinstance(n, ast.Name) and n.id == "fold") or (isinstance(n, ast.Attribute) and n.attr == "fold")
                   for n in ast.walk(node))

    found = []
    for path in sorted(ROOT.rglob("*.py")):
        relative = str(path.relative_to(ROOT.parent))
        if relative == FOLD_SEED_HOME:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult) and (
                    mentions_fold(node.left) or mentions_fold(node.right)):
                found.append(f"{relative}:{node.lineno}")
    return found


def test_one_fold_seed_formula():
    found = fold_seed_formulas()
    assert not found, f"a fold-seed formula outside {FOLD_SEED_HOME} (use fold_seed):\n" + "\n".join(found)


#: More facts with one home each (point 4 of issue 32): the module that alone may define it.
FACT_HOMES = {
    "metric direction": "spinediff/metrics/direction.py",
    "nnU-Net configuration list": "spinediff/planning/planner.py",
    "Dice formula": "spinediff/metrics/segmentation_metrics.py",
    "plans identifier literal": "spinediff/paths.py",
    "dataset ID pattern": "spinediff/paths.py",
    "model folder name": "spinediff/paths.py",
    "numpy-to-builtin conversion": "spinediff/io.py",
}
METRIC_NAMES = {"dice", "dice_pp", "psnr", "ssim", "mae", "mae_body", "mae_bone", "hd95"}
NNUNET_NAMES = {"2d", "3d_fullres", "3d_lowres", "3d_cascade_fullres"}


def _strings(node: ast.AST) -> set[str]:
    items = node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else node.keys if isinstance(
        node, ast.Dict) else []
    return {e.value for e in items if isinstance(e, ast.Constant) and isinstance(e.value, str)}


def _fact(node: ast.AST) -> str | None:
    """The fact ``node`` defines, if it is one of :data:`FACT_HOMES`."""
    if isinstance(node, ast.Dict) and len(_strings(node) & METRIC_NAMES) >= 2 and all(
            isinstance(v, ast.Constant) and (isinstance(v.value, bool) or v.value in ("higher", "lower"))
            for v in node.values):
        return "metric direction"  # {"dice": True, ...} or {"dice": "higher", ...}
    if isinstance(node, ast.Compare) and any(isinstance(op, ast.In) for op in node.ops) and any(
            _strings(c) & METRIC_NAMES for c in node.comparators) and "metric" in ast.unparse(node.left):
        return "metric direction"  # metric in ("dice", "psnr")
    if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "higher_is_better"
                                            for t in node.targets) and isinstance(node.value, ast.Constant):
        return "metric direction"  # a class attribute higher_is_better = True
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)) and len(_strings(node) & NNUNET_NAMES) >= 2:
        return "nnU-Net configuration list"
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and isinstance(node.left, ast.BinOp) and \
            isinstance(node.left.op, ast.Mult) and any(isinstance(n, ast.Constant) and n.value == 2
                                                       for n in (node.left.left, node.left.right)) and \
            isinstance(node.right, ast.BinOp) and isinstance(node.right.op, ast.Add):
        return "Dice formula"  # 2 * tp / (2 * tp + fp + fn)
    if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("nnUNetPlans") \
            and not any(c.isspace() for c in node.value):
        return "plans identifier literal"  # "nnUNetPlans", "nnUNetPlans.json", "nnUNetPlans_" (not prose)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "isinstance" and \
            "np.generic" in ast.unparse(node):
        return "numpy-to-builtin conversion"  # a hand-written to_builtin (io.to_builtin is the one)
    if isinstance(node, ast.JoinedStr):
        parts = node.values
        for before, after in zip(parts, parts[1:], strict=False):
            if isinstance(before, ast.Constant) and str(before.value).endswith("Dataset") and \
                    isinstance(after, ast.FormattedValue) and after.format_spec is not None:
                return "dataset ID pattern"  # f"Dataset{id:03d}_..." (a resolver or a name of its own)
        for a, middle, b in zip(parts, parts[1:], parts[2:], strict=False):
            if isinstance(a, ast.FormattedValue) and isinstance(b, ast.FormattedValue) and \
                    isinstance(middle, ast.Constant) and middle.value == "__":
                return "model folder name"  # f"{trainer}__{plans}__{configuration}"
    return None


def second_homes() -> list[str]:
    """Definitions of a fact of :data:`FACT_HOMES` outside its home module."""
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        relative = str(path.relative_to(ROOT.parent))
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            fact = _fact(node)
            if fact is not None and relative != FACT_HOMES[fact]:
                found.append(f"{relative}:{node.lineno}: {fact} (its home: {FACT_HOMES[fact]})")
    return found


def test_one_home_per_fact():
    found = second_homes()
    assert not found, "a second home of a fact (use the home's function or constant):\n" + "\n".join(found)


def test_the_checks_catch_what_they_look_for(tmp_path, monkeypatch):
    """A planted upward import, cycle and private import are found (the checks can fail)."""
    fake = tmp_path / "spinediff"
    for package in ("errors", "datasets", "training"):
        (fake / package).mkdir(parents=True)
        (fake / package / "__init__.py").write_text("")
    (fake / "__init__.py").write_text("")
    (fake / "datasets" / "a.py").write_text("from spinediff.training.b import _hidden\n")
    (fake / "training" / "b.py").write_text("def f(task):\n    from spinediff.datasets import a\n"
                                            "    return task == 'segmentation'\n"
                                            "def g(seed, trainer):\n    return seed + 1000 * trainer.fold\n"
                                            "DIRECTION = {'dice': 'higher', 'mae_body': 'lower'}\n"
                                            "class T:\n    higher_is_better = True\n"
                                            "def h(metric, tp, fp, fn, trainer, plans, configuration, i):\n"
                                            "    up = metric in ('dice', 'psnr')\n"
                                            "    configurations = ('2d', '3d_fullres')\n"
                                            "    dice = 2 * tp / (2 * tp + fp + fn)\n"
                                            "    plans = 'nnUNetPlans'\n"
                                            "    name = f'Dataset{i:03d}_X'\n"
                                            "    return f'{trainer}__{plans}__{configuration}'\n"
                                            "def plain(value):\n"
                                            "    return value.item() if isinstance(value, np.generic) else value\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", fake)
    graph = imports()
    assert ("spinediff.training.b", "_hidden") in graph["spinediff.datasets.a"]
    assert task_name_comparisons() == ["spinediff/training/b.py:3"]
    assert fold_seed_formulas() == ["spinediff/training/b.py:5"]
    assert sorted(f.split(": ", 1)[1].split(" (")[0] for f in second_homes()) == sorted(
        ["metric direction"] * 3 + ["nnU-Net configuration list", "Dice formula", "plans identifier literal",
                                    "dataset ID pattern", "model folder name", "numpy-to-builtin conversion"])
    for check in (test_imports_point_down_the_pipeline, test_no_module_imports_itself_back,
                  test_no_private_name_crosses_a_package_and_no_relative_imports,
                  test_tasks_are_classes_not_compared_names, test_one_fold_seed_formula, test_one_home_per_fact):
        try:
            check()
        except AssertionError:
            continue
        raise AssertionError(f"{check.__name__} missed the planted problem")


def test_the_top_level_api_names_real_functions_and_stays_light():
    """``spinediff.NAME`` gives the function the API table names; ``import spinediff`` loads no torch."""
    import subprocess

    for name, module in spinediff.API.items():
        assert getattr(spinediff, name) is getattr(__import__(module, fromlist=[name]), name)
    assert set(spinediff.__all__) == {"__version__", *spinediff.API}
    code = "import sys, spinediff; print('torch' in sys.modules, spinediff.__version__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", spinediff.__version__]
    assert (ROOT / "py.typed").is_file()  # PEP 561: the package's annotations are for type checkers
