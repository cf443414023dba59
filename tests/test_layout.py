"""The folder is the map: the core at the top of nanodo/, wings beside it, imports one way."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).parent.parent / 'nanodo'
# The core a reader opens first: the loop and the entry on top of the core's library.
TOP = {'nanodo.main', 'nanodo.train'}
CORE = {f'nanodo.{m}' for m in 'data evaluate loss model ops optimizer sharding step'.split()}
WINGS = ('nanodo.infra', 'nanodo.corpora', 'nanodo.tools', 'nanodo.research')
GROUND = 'nanodo.ground'


def _modules() -> dict[str, pathlib.Path]:
  modules = {}
  for path in PACKAGE.rglob('*.py'):
    parts = path.relative_to(PACKAGE.parent).with_suffix('').parts
    modules['.'.join(parts).removesuffix('.__init__')] = path
  return modules


def _imports(name: str, path: pathlib.Path) -> set[str]:
  """The modules of nanodo that the module name imports (a package counts as its modules)."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text(encoding='utf-8'))):
    if isinstance(node, ast.Import):
      found |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      found |= {f'{node.module}.{a.name}' for a in node.names} | {node.module}
  modules = _modules()
  return {m for m in found if m in modules and m != name and m != 'nanodo'}


def _within(module: str, *packages: str) -> bool:
  return any(module == p or module.startswith(p + '.') for p in packages)


IMPORTS = {name: _imports(name, path) for name, path in _modules().items()}


@pytest.mark.parametrize('name', sorted(IMPORTS))
def test_imports_flow_one_way(name):
  imported = IMPORTS[name]
  if _within(name, GROUND):
    assert all(_within(m, GROUND) for m in imported), imported
  elif name in CORE or _within(name, 'nanodo.configs'):
    # The core's library imports only itself and the ground floor: no wing, never the loop.
    outside = {m for m in imported if not (m in CORE or _within(m, 'nanodo.configs', GROUND))}
    assert not outside, f'{name} imports {outside}'
  elif _within(name, *WINGS):
    assert not imported & TOP, f'{name} imports {imported & TOP}'
  else:
    assert name in TOP | {'nanodo', *WINGS, GROUND, 'nanodo.configs'}, f'{name} has no place'


@pytest.mark.parametrize('name', ['nanodo.model', 'nanodo.loss', 'nanodo.step'])
def test_the_model_the_loss_and_the_step_know_no_run_or_corpus(name):
  assert not {m for m in IMPORTS[name] if _within(m, 'nanodo.infra', 'nanodo.corpora')}


def test_no_import_cycle():
  floor = {}

  def visit(m: str, stack: tuple[str, ...]) -> int:
    assert m not in stack, ' -> '.join((*stack, m))
    if m not in floor:
      floor[m] = 1 + max((visit(d, (*stack, m)) for d in IMPORTS[m]), default=0)
    return floor[m]

  assert max(visit(m, ()) for m in IMPORTS) <= 7  # the longest chain a reader climbs


def test_the_top_of_the_package_holds_the_core_only():
  top = {p.stem for p in PACKAGE.glob('*.py') if p.stem != '__init__'}
  assert {f'nanodo.{m}' for m in top} == TOP | CORE
  assert len(top) <= 10


@pytest.mark.parametrize('folder', ['nanodo', 'tests', 'benchmarks'])
def test_no_file_is_over_250_lines(folder):
  root = PACKAGE.parent / folder
  long = {str(p): n for p in root.rglob('*.py') if (n := len(p.read_text().splitlines())) > 250}
  assert not long
