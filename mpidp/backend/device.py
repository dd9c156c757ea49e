"""Device binding and the one place that makes device data safe for MPI."""
from .xp import cupy_module, is_cupy


def bind_device(local_rank):
    """Make ``local_rank % device_count`` this process's current CUDA device; None without a GPU."""
    cp = cupy_module()
    if cp is None:
        return None
    count = cp.cuda.runtime.getDeviceCount()
    device = local_rank % count
    cp.cuda.Device(device).use()
    return device


def sync_before_mpi(*arrays):
    """Wait for the current stream when any array lives on the device (mpi4py never synchronises)."""
    for x in arrays:
        if is_cupy(x):
            import cupy
            cupy.cuda.get_current_stream().synchronize()
            return
