"""The modules' layering (docs/ARCHITECTURE.md): files.py <- tokenizer.py <- model.py <- hf.py <- the
scripts, no import circle, and one family of errors under files.NanoError.

Read from the source with `ast`, not by importing: every top-level .py file of the repository is a
module (whatever files exist), and an import counts wherever it is written, at the top of a file or
inside a function, so a circle cannot hide in a function-level import.
"""

import ast
import builtins
import glob
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the bottom layers, lowest first: each may import only the ones before it
BASE_LAYERS = ["files", "tokenizer", "model", "llama2c", "hf"]


def read_modules():
    """{module name: (path, ast tree)} for every top-level .py file of the repository."""
    mods = {}
    for path in sorted(glob.glob(os.path.join(REPO, "*.py"))):
        with open(path, encoding="utf-8") as f:
            mods[os.path.basename(path)[:-3]] = (path, ast.parse(f.read(), path))
    return mods


def _enclosing_functions(tree):
    """{id(node): name of the innermost function around it} for every node inside a function."""
    inside = {}

    def visit(node, func):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child, child.name)
            else:
                if func:
                    inside[id(child)] = func
                visit(child, func)

    visit(tree, None)
    return inside


def project_imports(mods):
    """{module: {imported project module: [where, ...]}}; where: 'line N' or 'line N, inside f()'."""
    graph = {}
    for name, (_, tree) in mods.items():
        funcs, edges = _enclosing_functions(tree), {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets = [node.module.split(".")[0]]
            else:
                continue
            where = f"line {node.lineno}" + (f", inside {funcs[id(node)]}()" if id(node) in funcs else "")
            for t in targets:
                if t in mods and t != name:
                    edges.setdefault(t, []).append(where)
        graph[name] = edges
    return graph


def find_circle(graph):
    """One circle of the graph as [a, b, ..., a], or None."""
    state, stack = {}, []  # state: 1 on the current path, 2 done

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, {})):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_circle():
    graph = project_imports(read_modules())
    circle = find_circle(graph)
    if circle:
        steps = [f"{a}.py imports {b} ({'; '.join(graph[a][b])})" for a, b in zip(circle, circle[1:])]
        raise AssertionError(f"import circle {' -> '.join(circle)}: " + ", ".join(steps))


def test_files_imports_no_project_module():
    graph = project_imports(read_modules())
    assert graph["files"] == {}, f"files.py is the bottom layer, yet imports {graph['files']}"


def test_bottom_layers_import_only_lower_ones():
    graph = project_imports(read_modules())
    for i, name in enumerate(BASE_LAYERS):
        if name not in graph:
            continue
        above = {m: w for m, w in graph[name].items() if m not in BASE_LAYERS[:i]}
        assert not above, f"{name}.py may import only {BASE_LAYERS[:i] or 'no project module'}, yet imports {above}"


def test_find_circle_finds_one():
    """The checker itself: a circle through a function-level import is found and named."""
    assert find_circle({"a": {"b": ["line 1"]}, "b": {"c": ["line 2, inside f()"]}, "c": {"a": ["line 3"]}}) == \
        ["a", "b", "c", "a"]
    assert find_circle({"a": {"b": ["line 1"]}, "b": {}, "c": {"a": ["line 1"], "b": ["line 2"]}}) is None


# ---------------------------------------------------------------------------
# Errors: every exception class of the project derives from files.NanoError


def _base_ref(module, expr, imported):
    """A class's base as (module or None, class name): 'NanoError' (this module's or one imported by
    name), 'files.NanoError', or an outside name such as 'ValueError' (module None)."""
    if isinstance(expr, ast.Attribute) and isinstance(expr.value, ast.Name):
        return expr.value.id, expr.attr
    if isinstance(expr, ast.Name):
        return imported.get(expr.id, (module, expr.id))
    return None, ast.unparse(expr)


def error_classes(mods):
    """[(module, line, class name, 'nano' | 'other exception' | 'not an exception', bases)] for every
    class defined in a project module (at any depth)."""
    classes, bases = {}, {}
    for name, (_, tree) in mods.items():
        imported = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in mods:
                for a in node.names:
                    imported[a.asname or a.name] = (node.module, a.name)
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                classes[(name, node.name)] = node.lineno
                bases[(name, node.name)] = [_base_ref(name, b, imported) for b in node.bases]

    def kind(ref, seen=()):
        if ref == ("files", "NanoError"):
            return "nano"
        if ref in bases and ref not in seen:
            kinds = [kind(b, seen + (ref,)) for b in bases[ref]]
            return "nano" if "nano" in kinds else "other exception" if "other exception" in kinds else "not an exception"
        outside = getattr(builtins, ref[1], None)
        if isinstance(outside, type) and issubclass(outside, BaseException) or ref[1].endswith(("Error", "Exception")):
            return "other exception"
        return "not an exception"

    return [(m, line, c, kind((m, c)), bases[(m, c)]) for (m, c), line in sorted(classes.items())]


def test_nano_error_is_the_base():
    from files import ConfigError, DataError, NanoError, OutputError
    assert issubclass(NanoError, Exception)
    assert all(issubclass(e, NanoError) for e in (ConfigError, DataError, OutputError))


def test_error_classes_checker():
    """The checker itself, on made-up modules: bases by name, by module attribute, through a chain."""
    source = {"files": "class NanoError(ValueError): pass\nclass ConfigError(NanoError): pass",
              "a": "import files\nfrom files import ConfigError\nclass Good(ConfigError): pass\n"
                   "class AlsoGood(files.NanoError): pass\nclass Bad(RuntimeError): pass\n"
                   "class Worse(Bad): pass\nclass Plain: pass\nclass HTTPish(HTTPException): pass"}
    mods = {name: (name + ".py", ast.parse(text)) for name, text in source.items()}
    kinds = {c: k for m, _, c, k, _ in error_classes(mods) if m == "a"}
    assert kinds == {"Good": "nano", "AlsoGood": "nano", "Bad": "other exception", "Worse": "other exception",
                     "Plain": "not an exception", "HTTPish": "other exception"}


def test_every_error_class_is_a_nano_error():
    mods = read_modules()
    bad = [f"{m}.py:{line} {c}({', '.join(b for _, b in bases)})" for m, line, c, k, bases in error_classes(mods)
           if k == "other exception" and (m, c) != ("files", "NanoError")]
    assert not bad, "error classes that do not derive from files.NanoError: " + "; ".join(bad)


# ---------------------------------------------------------------------------
# What training start-up loads: train.py imports eval.py (the train config's eval_tasks), which loads
# models as infer.py does; none of that may bring in the exporters (export.py, gguf_export.py and the
# gguf package they need), which a training run never uses


def reachable(graph, start):
    """Every project module `start` imports, directly or through others (function-level imports too)."""
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), {}):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_training_start_up_does_not_import_the_exporters():
    import subprocess
    import sys
    graph = project_imports(read_modules())
    for script in ("train", "eval"):
        found = reachable(graph, script) & {"export", "gguf_export"}
        assert not found, f"{script}.py reaches {sorted(found)} through its imports (even inside a function)"
    code = ("import sys, train, eval; "
            "print(' '.join(m for m in ('export', 'gguf_export', 'gguf', 'eval', 'infer') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["eval", "infer"], f"importing train and eval loaded: {r.stdout.strip()}"


def test_reachable_follows_the_graph():
    """The checker itself: through a function-level import, and not backwards."""
    graph = {"a": {"b": ["line 1"]}, "b": {"c": ["line 2, inside f()"]}, "c": {}, "d": {"a": ["line 1"]}}
    assert reachable(graph, "a") == {"b", "c"} and reachable(graph, "c") == set()
