"""Every docstring example in src/rprop runs, each module in a fresh interpreter
(so an example cannot lean on what another imported or defined)."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
# Imports an optional extra brings; a module needing a missing one is skipped.
OPTIONAL = {"jax", "optax", "scipy", "sklearn", "triton", "hypothesis"}


def _modules_with_examples():
    names = []
    for path in sorted((SRC / "rprop").rglob("*.py")):
        if ">>>" in path.read_text(encoding="utf-8"):
            parts = path.relative_to(SRC).with_suffix("").parts
            names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


MODULES = _modules_with_examples()

# One fresh interpreter runs every module's examples (each module's doctest
# gets its own globals); torch's import dominates the time, so one start, not
# one per module.
RUNNER = textwrap.dedent("""
    import doctest, importlib, sys
    optional = set(sys.argv[1].split(","))
    for name in sys.argv[2:]:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if (err.name or "").split(".")[0] in optional:
                print("RESULT", name, "skip", err.name, flush=True)
                continue
            raise
        flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
        result = doctest.testmod(module, optionflags=flags)
        print("RESULT", name, result.attempted, result.failed, flush=True)
""")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    done = subprocess.run(
        [sys.executable, "-c", RUNNER, ",".join(sorted(OPTIONAL)), *MODULES],
        capture_output=True, text=True, timeout=300, cwd=tmp_path_factory.mktemp("doctest"),
    )
    lines = [line.split()[1:] for line in done.stdout.splitlines()
             if line.startswith("RESULT ")]
    return {fields[0]: fields[1:] for fields in lines}, done.stdout + done.stderr


def test_examples_are_found():
    assert "rprop.torch._optimizer" in MODULES  # the Rprop class docstring has one


@pytest.mark.slow
@pytest.mark.parametrize("module", MODULES)
def test_docstring_examples_run(module, results):
    by_module, out = results
    assert module in by_module, out[-4000:]
    fields = by_module[module]
    if fields[0] == "skip":
        pytest.skip(f"optional dependency {fields[1]} is not installed")
    attempted, failed = int(fields[0]), int(fields[1])
    assert attempted > 0 and failed == 0, out[-4000:]
