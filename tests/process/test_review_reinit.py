"""An optimizer built before shutdown(); init() goes on working after it: its plan check (re-run
after set_backward_passes_per_step or replan) runs on the communicator of the new init, for the
global set and for a process set registered again."""
import textwrap

import pytest

from _mpirun import python, run

pytestmark = pytest.mark.spawns


def test_optimizer_recheck_after_reinit(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent("""
        import numpy, mpidp
        from mpidp import nn, optim
        mpidp.init()
        r, n = mpidp.rank(), mpidp.size()
        s = mpidp.add_process_set([0, 1])
        x = numpy.ones((2, 4), numpy.float32) * (r + 1)
        m = nn.Linear(4, 3)
        opt = mpidp.DistributedOptimizer(optim.SGD(m.parameters(), lr=0.1), model=m)
        if s.included():
            ms = nn.Linear(4, 3)
            opts = mpidp.DistributedOptimizer(optim.SGD(ms.parameters(), lr=0.1), model=ms, process_set=s)

        def step(m, opt):
            m.backward(m(x)); opt.step(); opt.zero_grad()
            return m.weight.data.copy()

        step(m, opt)
        if s.included():
            step(ms, opts)
        mpidp.shutdown()
        mpidp.init(process_sets=[s])
        opt.set_backward_passes_per_step(1)   # the plan is checked again at the next step
        w = step(m, opt)
        if s.included():
            opts.replan(1 << 20)
            ws = step(ms, opts)
            assert numpy.array_equal(ws, mpidp.broadcast(ws, root_rank=0, process_set=s))
        assert numpy.array_equal(w, mpidp.broadcast(w, root_rank=0))
        print(f"[rank {r}] ok", flush=True)
        mpidp.shutdown()
    """))
    rc, out, _ = run(python(script), np=3, timeout=60, env={"MPIR_CVAR_ENABLE_HEAVY_YIELD": "1"})
    assert rc == 0 and out.count("] ok") == 3, out[-3000:]
