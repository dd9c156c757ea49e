"""Python-object collectives; pickled out of band (mpi4py.util.pkl5) so objects over 2 GiB work."""
from mpi4py.util import pkl5

from . import _fatal, check
from .engine import engine_for
from .process_set import job_rank, resolve


def _run(process_set, kind, name, fields, transfer):
    """Check ``fields`` across the ranks, then ``transfer(comm, joined)`` (``joined``: the ranks that
    take part with nothing to contribute, ``mpidp.join``), as one job in order."""
    ps, comm = resolve(process_set)
    eng = engine_for(comm)
    seq = eng.started()
    label = name or f"{kind}.{seq}"
    signature = (("collective", kind), ("process set", eng.progress.label), ("name", name)) + fields

    def job():
        joined = check.compare(comm, kind, label, signature, seq) if check.is_enabled() else ()
        try:
            return transfer(pkl5.Intracomm(comm), joined)
        except BaseException as exc:
            _fatal.after_agreement(comm, f"{kind} of {label!r}", exc)

    return eng.run(job, label, seq)


def broadcast_object(obj, root_rank=0, name=None, process_set=None):
    """``root_rank``'s ``obj`` on every rank."""
    ps, _ = resolve(process_set)
    root_rank = job_rank(root_rank, f"broadcast_object of {name!r}" if name else "broadcast_object")
    root = ps.to_local(root_rank)
    return _run(process_set, "broadcast_object", name, (("root_rank", root_rank),),
                lambda c, joined: c.bcast(obj, root=root))


def allgather_object(obj, name=None, process_set=None):
    """A list with every rank's ``obj``, in rank order (ranks that joined give none, as in Horovod)."""
    return _run(process_set, "allgather_object", name, (),
                lambda c, joined: [o for r, o in enumerate(c.allgather(obj)) if r not in joined])
