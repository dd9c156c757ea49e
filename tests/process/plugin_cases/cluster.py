"""Run by plain pytest with --mpidp-nodes 2x2,2+1: the mpi tests on simulated clusters."""
import os

import pytest


@pytest.mark.mpi(min_size=2)
def test_topology(comm, rank):
    import mpidp

    mpidp.init()
    nodes = comm.allgather(int(os.environ["MPIDP_SIM_NODE"]))
    mine = nodes[rank]
    assert (mpidp.local_rank(), mpidp.local_size()) == (nodes[:rank].count(mine), nodes.count(mine))
    assert mpidp.cross_size() == sum(nodes.count(n) > mpidp.local_rank() for n in set(nodes))


@pytest.mark.mpi(min_size=3)
def test_fails_on_node_1():
    assert os.environ["MPIDP_SIM_NODE"] != "1", "planted failure on simulated node 1"
