"""The import layering of pyproject's [tool.importlinter] contracts holds (checked by import-linter), no module
imports itself through others, and the command line loads a benchmark only when asked for one."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_hold():
    lint_imports = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint_imports)], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "4 kept, 0 broken" in result.stdout


def test_no_import_cycle():
    """No module of vera_jax or train reaches, through its imports (lazy ones included), a module that imports it."""
    import grimp

    graph = grimp.build_graph("vera_jax", "train")
    cycles = sorted((importer, imported) for importer in graph.modules
                    for imported in graph.find_modules_directly_imported_by(importer)
                    if graph.chain_exists(importer=imported, imported=importer))
    assert cycles == []


def test_the_command_line_loads_no_benchmark_until_asked():
    """Building the parser, ``classify --help`` and ``bench --help`` import no module of train.bench; running a bench
    command does."""
    script = """
import sys
from train.__main__ import build_parser, main
def loaded():
    return sorted(name for name in sys.modules if name == "train.bench" or name.startswith("train.bench."))
build_parser()
print(loaded(), main(["classify", "--help"]), main(["bench", "--help"]), main(["bench-multi", "--help"]), loaded())
main(["bench", "--base-dtype", "bfloat16"])  # refused by the benchmark itself, once loaded
print(loaded())
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("[")]
    assert lines[0] == "[] 0 0 0 []"
    assert "train.bench.step" in lines[1]
    assert "error: --base-dtype bfloat16 is measured on the causal-LM workload" in result.stderr


def test_import_vera_jax_is_light_and_names_its_submodules():
    """`import vera_jax` loads no Orbax, PyTorch or transformers; its submodules load when first named."""
    script = """
import sys
import vera_jax
heavy = sorted(name for name in ("orbax", "torch", "transformers", "vera_jax.peft", "vera_jax.nnx") if name in sys.modules)
print(heavy)
print(vera_jax.checkpoint.save.__module__, vera_jax.peft.save_adapter.__module__, vera_jax.lora.save_lora.__module__,
      vera_jax.nnx.attach.__module__, vera_jax.export.save_merged.__module__, len(vera_jax.hf.TUNIX_GEMMA))
try:
    vera_jax.checkpoints
except AttributeError as err:
    print(err)
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.splitlines() == [
        "[]", "vera_jax.checkpoint vera_jax.peft vera_jax.lora vera_jax.nnx.attach vera_jax.export 5",
        "module 'vera_jax' has no attribute 'checkpoints'"]


def test_every_library_module_imports_without_the_application_stack():
    """The library's dependencies are what it imports: every vera_jax module loads with transformers,
    datasets and torch unavailable (each import of them fails, as if not installed)."""
    script = """
import importlib, pkgutil, sys
for name in ("transformers", "datasets", "torch", "peft", "tunix"):
    sys.modules[name] = None  # `import name` raises ImportError
import vera_jax
modules = [info.name for info in pkgutil.walk_packages(vera_jax.__path__, "vera_jax.")]
for name in modules:
    importlib.import_module(name)
print(len(modules), "vera_jax.nnx.attach" in modules, "vera_jax.peft" in modules)
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    count, has_nnx, has_peft = result.stdout.split()
    assert int(count) >= 30 and has_nnx == has_peft == "True"
