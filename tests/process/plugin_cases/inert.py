"""Run by plain pytest without --mpidp: the plugin must not import MPI or change anything."""
import sys

import pytest


def test_mpi_not_imported(pytestconfig):
    assert "mpi4py" not in sys.modules
    assert pytestconfig.pluginmanager.get_plugin("mpidp-session") is None


@pytest.mark.mpi(min_size=2)
def test_skipped_at_one_rank():
    raise AssertionError("must be skipped")


def test_fixtures_import_mpi_on_request(rank, size):
    assert (rank, size) == (0, 1)
