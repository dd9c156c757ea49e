"""Every ``MPIDP_*`` environment variable, read in one place with typed defaults.

The README's "Configuration" table lists the same names; ``describe()`` prints them.
"""
import os

# name -> (type, default, one-line meaning)
VARIABLES = {
    "MPIDP_CUDA_AWARE": (str, "auto", "0/1 forces CUDA-aware MPI off/on; auto asks MPIX_Query_cuda_support"),
    "MPIDP_CHECK": (bool, True, "cross-rank mismatch check of every collective's shape/dtype/op/root"),
    "MPIDP_FUSION_THRESHOLD": (int, 0, "gradient bucket size in bytes; 0 = calibrated default"),
    "MPIDP_PIECE_BYTES": (int, 0, "bytes one rank reduces per ring step of a large allreduce (or per in-place "
                                  "Allreduce call where the ring does not apply); 0 = the measured default (2 MiB)"),
    "MPIDP_HIERARCHICAL": (str, "auto", "multi-node allreduce through the nodes' shared memory: auto (from the size the "
                                        "tune cache measured, else the default), on, off, or the smallest message in bytes"),
    "MPIDP_STALL_WARNING_S": (float, 60.0, "seconds a rank waits in a collective before it logs the missing ranks"),
    "MPIDP_STALL_ABORT_S": (float, 300.0, "seconds a rank waits in a collective that some ranks never joined "
                                          "before it ends the job with the stall report; 0 = never"),
    "MPIDP_TIMELINE": (str, "", "path of a Chrome-trace timeline written at shutdown; empty = off"),
    "MPIDP_AUTOTUNE": (bool, False, "measure bucket and piece size during the first steps"),
    "MPIDP_AUTOTUNE_CACHE": (str, "~/.cache/mpidp/tune.json", "where tuned settings are cached"),
    "MPIDP_ABORT_ON_EXCEPTION": (bool, True, "an uncaught exception on any rank aborts the whole job"),
    "MPIDP_INIT_TIMEOUT_S": (float, 300.0, "a rank stuck this long in MPI_Init (a peer died before it) exits; 0 = wait forever"),
    "MPIDP_EXIT_TIMEOUT_S": (float, 60.0, "a rank exiting without shutdown() aborts the job if peers do not also exit within this"),
}

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def get(name):
    """Return the typed value of ``name`` from the environment, or its default."""
    kind, default, _ = VARIABLES[name]
    raw = os.environ.get(name)
    if raw is None:
        return default
    raw = raw.strip()
    try:
        if kind is bool:
            if raw.lower() in _TRUE:
                return True
            if raw.lower() in _FALSE:
                return False
            raise ValueError(raw)
        return kind(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not a valid {kind.__name__}; "
                         f"unset it or give a value like {default!r}") from None


def describe():
    """Lines 'NAME=value  (meaning)' for every variable, as a user would debug them."""
    return [f"{n}={get(n)!r}  ({VARIABLES[n][2]})" for n in VARIABLES]
