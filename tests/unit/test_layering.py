"""Imports point down the layer table (DESIGN.md): checked by parsing every module."""
import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "mpidp"

# package prefix -> imports it must never make (at any depth inside the module)
FORBIDDEN = {
    "mpidp/backend": ("mpi4py", "mpidp.comm", "mpidp.nn", "mpidp.optim", "mpidp.distributed"),
    "mpidp/nn": ("mpi4py", "mpidp.comm", "mpidp.distributed", "mpidp.fusion", "cupy"),
    "mpidp/optim": ("mpi4py", "mpidp.comm", "mpidp.distributed", "cupy"),
    "mpidp/offload": ("mpi4py", "mpidp.comm", "mpidp.distributed"),
    "mpidp/fusion": ("mpi4py", "mpidp.nn", "mpidp.optim", "mpidp.distributed"),
    "mpidp/comm": ("mpidp.nn", "mpidp.optim", "mpidp.distributed", "mpidp.fusion", "cupy"),
    "mpidp/data/sampler.py": ("mpi4py",),
    "mpidp/launch": ("mpidp.comm", "mpidp.nn", "mpidp.distributed"),
}


def imports(path):
    tree = ast.parse(path.read_text())
    package = ".".join(path.relative_to(PKG.parent).with_suffix("").parts[:-1])
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            yield module, node.lineno
            for alias in node.names:  # "from .. import comm" names a module too
                yield f"{module}.{alias.name}", node.lineno


CASES = [(prefix, path) for prefix in FORBIDDEN for path in sorted(PKG.parent.glob(prefix + ("" if prefix.endswith(".py") else "/**/*.py")))]


@pytest.mark.parametrize("prefix, path", CASES, ids=[str(p.relative_to(PKG.parent)) for _, p in CASES])
def test_imports_point_down(prefix, path):
    bad = [(m, line) for m, line in imports(path)
           if any(m == f or m.startswith(f + ".") for f in FORBIDDEN[prefix])]
    assert not bad, f"{path.relative_to(PKG.parent)} imports {bad}, which {prefix} must not (DESIGN.md layers)"


def test_import_mpidp_does_not_initialise_mpi():
    import subprocess
    import sys
    code = ("import mpidp, mpidp.nn, mpidp.optim, mpidp.launch, sys; "
            "assert 'mpi4py.MPI' not in sys.modules, 'MPI imported'; "
            "assert 'cupy' not in sys.modules, 'cupy imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
