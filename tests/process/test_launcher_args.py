"""mpidprun checks its own arguments before it asks the ranks' python anything (a usage error first)."""
import os

import pytest

from mpidp.launch import cli


@pytest.fixture
def python_without_mpi4py(tmp_path, monkeypatch):
    """'python' on PATH is one whose mpi4py probe would fail."""
    fake = tmp_path / "bin" / "python"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho \"ModuleNotFoundError: No module named 'mpi4py'\" >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    for key in list(os.environ):
        if key.startswith(("SLURM_", "PMI_", "HYDRA_", "OMPI_", "PMIX_")):
            monkeypatch.delenv(key)
    return fake


@pytest.mark.parametrize("args, message", [
    (["--mpi", "srun", "-H", "a:2", "python", "x.py"], "srun takes its hosts from the Slurm allocation"),
    (["-np", "2", "--mpiexec", "/no/such/mpiexec", "python", "x.py"],
     "--mpiexec /no/such/mpiexec: not found or not executable"),
    (["-np", "2", "--restarts", "-1", "python", "x.py"], "--restarts -1: must be 0 or more"),
    (["-np", "0", "python", "x.py"], "-np 0: the number of ranks must be at least 1"),
])
def test_usage_errors_come_before_the_probe(python_without_mpi4py, capsys, args, message):
    rc = cli.main(args)
    out, err = capsys.readouterr()
    assert rc == 2 and out == "" and err.count("\n") == 1, err
    assert message in err and "mpi4py" not in err, err


def test_the_probe_error_still_comes_for_good_arguments(python_without_mpi4py, capsys):
    assert cli.main(["-np", "2", "python", "x.py"]) == 2
    assert "cannot load mpi4py.MPI" in capsys.readouterr().err
