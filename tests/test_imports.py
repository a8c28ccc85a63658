"""Import structure: layers, no lmmask import inside a function, no import cycle.

The graph counts every module-level import between the repository's non-test
Python files, including the package `__init__.py` a submodule import runs.
"""
import ast
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOTS = ("lmmask", "configs", "experiments", "benchmarks")

# Each module imports only from its own layer or lower ones. A module listed here by
# its package (`lmmask.data`) covers every module inside it.
LAYERS = (
    # 1 core: pure functions and the model, no I/O of their own
    ("lmmask.batching", "lmmask.masks", "lmmask.model", "lmmask.losses", "lmmask.optim",
     "lmmask.parallel", "lmmask.decode"),
    # 2 corpora: reading, tokenizing, packing, shards
    ("lmmask.data",),
    # 3 state: the config, the step, checkpoints and workdirs
    ("lmmask.config", "lmmask.step", "lmmask.checkpoint", "lmmask.workdir"),
    # 4 what is done with a checkpoint
    ("lmmask.eval", "lmmask.interop"),
    # 5 runs
    ("lmmask.train", "lmmask.seedvmap", "lmmask.sweep", "lmmask.report", "lmmask.cluster",
     "lmmask.multiprocess", "lmmask.preempt", "lmmask.lowering"),
    # 6 entry points and scripts
    ("launch", "configs", "experiments", "benchmarks"),
)


def _files():
  out = [os.path.join(REPO, "launch.py")]
  for root in ROOTS:
    for dirpath, _, names in os.walk(os.path.join(REPO, root)):
      out += [os.path.join(dirpath, n) for n in names if n.endswith(".py")]
  return sorted(out)


def _module(path):
  rel = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
  return rel[:-len(".__init__")] if rel.endswith(".__init__") else rel


def _targets(node):
  """lmmask modules an import statement loads (with their parent packages)."""
  names = []
  if isinstance(node, ast.Import):
    names = [a.name for a in node.names]
  elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
    names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
  out = set()
  for n in names:
    if n == "lmmask" or n.startswith("lmmask."):
      parts = n.split(".")
      out |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
  return out


def _graph():
  modules = {_module(p): p for p in _files()}
  graph, late = {}, []
  for mod, path in modules.items():
    tree = ast.parse(open(path).read(), path)
    deps = set()
    for node in ast.walk(tree):
      t = _targets(node)
      if not t:
        continue
      deps |= t
    for fn in ast.walk(tree):
      if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
        for node in ast.walk(fn):
          if _targets(node):
            late.append(f"{mod}:{node.lineno}")
    graph[mod] = {d for d in deps if d in modules and d != mod}
    parent = mod.rsplit(".", 1)[0] if "." in mod else None
    if parent in modules:
      graph[mod].add(parent)
  return graph, late


def _cycle(graph):
  state = {}
  stack = []

  def visit(n):
    state[n] = 1
    stack.append(n)
    for m in sorted(graph.get(n, ())):
      if state.get(m) == 1:
        return stack[stack.index(m):] + [m]
      if m not in state:
        found = visit(m)
        if found:
          return found
    stack.pop()
    state[n] = 2
    return None
  for n in sorted(graph):
    if n not in state:
      found = visit(n)
      if found:
        return found
  return None


def test_no_function_level_lmmask_import():
  _, late = _graph()
  assert late == []


def test_no_import_cycle():
  graph, _ = _graph()
  assert _cycle(graph) is None


def test_the_checker_finds_a_planted_cycle_and_a_late_import():
  """The checker's planted-bug twin: a two-module cycle and an import in a function."""
  assert _cycle({"lmmask.a": {"lmmask.b"}, "lmmask.b": {"lmmask.a"}}) is not None
  fn = ast.parse("def f():\n  from lmmask import train\n").body[0]
  assert any(_targets(n) for n in ast.walk(fn))


def layer_of(mod):
  """The layer index of a module (its longest listed prefix), None for the package root."""
  if mod == "lmmask":
    return None
  for i, names in enumerate(LAYERS):
    if any(mod == n or mod.startswith(n + ".") for n in names):
      return i
  raise AssertionError(f"module {mod} is in no layer: add it to LAYERS in tests/test_imports.py")


def upward_arrows(graph):
  """Every import from a lower layer to a higher one, as 'importer -> imported'."""
  out = []
  for mod, deps in sorted(graph.items()):
    mine = layer_of(mod)
    for d in sorted(deps):
      theirs = layer_of(d)
      if mine is not None and theirs is not None and theirs > mine:
        out.append(f"{mod} (layer {mine + 1}) -> {d} (layer {theirs + 1})")
  return out


def test_imports_respect_the_layers():
  graph, _ = _graph()
  assert upward_arrows(graph) == []


def test_the_layer_checker_finds_a_planted_upward_arrow():
  """Planted-bug twin: the core importing the training loop, and a corpus module
  importing evaluation, must both be reported."""
  graph, _ = _graph()
  graph = {k: set(v) for k, v in graph.items()}
  graph["lmmask.model"].add("lmmask.train")
  graph["lmmask.data.shards"].add("lmmask.eval.floor")
  arrows = upward_arrows(graph)
  assert "lmmask.model (layer 1) -> lmmask.train (layer 5)" in arrows
  assert "lmmask.data.shards (layer 2) -> lmmask.eval.floor (layer 4)" in arrows
  assert len(arrows) == 2
