"""Exception classes shared by every layer of mpidp."""


class MpidpError(RuntimeError):
    """Base class of mpidp's own errors."""


class NotInitializedError(MpidpError):
    """An mpidp call that needs MPI was made before ``mpidp.init()``."""


class MismatchError(MpidpError, ValueError):
    """Ranks called the same collective with different arguments.

    Raised on every rank of the communicator; ``tensor``, ``field`` and
    ``ranks`` (a dict value -> list of ranks) say what differed.
    """

    def __init__(self, message, tensor=None, field=None, ranks=None):
        super().__init__(message)
        self.tensor = tensor
        self.field = field
        self.ranks = ranks or {}


class StallError(MpidpError):
    """A collective waited past ``MPIDP_STALL_ABORT_S`` for ranks that never joined."""


class CheckpointError(MpidpError):
    """A checkpoint is missing, truncated, corrupt or belongs to another model."""


class LaunchError(MpidpError):
    """``mpidprun`` was given input it cannot turn into a job."""


class HostfileError(LaunchError, ValueError):
    """A hostfile or host list line is not in a syntax mpidp knows."""


def describe_ranks(values_by_rank):
    """Format ``{rank: value}`` as 'ranks 0,2 have X; rank 1 has Y' (groups in first-rank order)."""
    groups = {}
    for rank in sorted(values_by_rank):
        groups.setdefault(repr(values_by_rank[rank]), []).append(rank)
    parts = []
    for value, ranks in groups.items():
        who = ("rank " if len(ranks) == 1 else "ranks ") + ",".join(map(str, ranks))
        parts.append(f"{who} {'has' if len(ranks) == 1 else 'have'} {value}")
    return "; ".join(parts)
