"""SyncBatchNorm: batch statistics (and their gradients) summed over all ranks."""
from ..comm import collectives, ops
from ..nn.layers.norm import BatchNorm1d, BatchNorm2d, _BatchNorm


class SyncBatchNorm(_BatchNorm):
    """BatchNorm whose per-channel sums are allreduced: N ranks x B trains as 1 process x N*B.

    Accepts (N, C), (N, C, L) and (N, C, H, W) inputs. Every rank must call it
    the same number of times (each forward and backward is a collective).
    """

    _ndims = (2, 3, 4)

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 dtype=None, process_set=None, **kw):
        if dtype is not None:
            kw["dtype"] = dtype
        super().__init__(num_features, eps, momentum, affine, track_running_stats, **kw)
        self.process_set = process_set

    def _reduce_sums(self, sums):
        return collectives.grouped_allreduce(sums, op=ops.Sum, name="SyncBatchNorm",
                                             process_set=self.process_set)

    @classmethod
    def convert_sync_batchnorm(cls, module, process_set=None):
        """Replace every BatchNorm1d/2d in ``module`` by a SyncBatchNorm with the same state."""
        for owner in list(module.modules()):
            for name, child in list(owner.named_children()):
                if isinstance(child, (BatchNorm1d, BatchNorm2d)) and not isinstance(child, cls):
                    sync = cls(child.num_features, child.eps, child.momentum, child.weight is not None,
                               child.track_running_stats, dtype=child.running_mean.dtype
                               if child.track_running_stats else None, process_set=process_set)
                    if child.weight is not None:
                        sync.weight, sync.bias = child.weight, child.bias
                    for key, value in child.named_buffers():
                        setattr(sync, key, value)
                    setattr(owner, name, sync)
        return module
