"""Parameter: an array, its gradient and the gradient-ready hooks the distributed optimizer uses."""
import itertools

from ..backend.xp import get_array_module, to_module

_handle_ids = itertools.count()


class RemovableHandle:
    """Returned by every ``register_*hook``; ``remove()`` takes the hook out again."""

    __slots__ = ("_store", "id")

    def __init__(self, store):
        self._store = store
        self.id = next(_handle_ids)

    def remove(self):
        """Unregister the hook (a second call does nothing)."""
        self._store.pop(self.id, None)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def add_hook(store, fn):
    """Put ``fn`` into the ordered dict ``store`` and return its handle."""
    if not callable(fn):
        raise TypeError(f"a hook must be callable, got {type(fn).__name__}; pass a function")
    handle = RemovableHandle(store)
    store[handle.id] = fn
    return handle


class Parameter:
    """A trainable array ``data`` with a same-shape ``grad`` that layers accumulate into in place."""

    __slots__ = ("_data", "_grad", "name", "requires_grad", "_hooks", "_uses", "__weakref__")

    def __init__(self, data, name=None, requires_grad=True):
        xp = get_array_module(data)
        if not hasattr(data, "shape") or not hasattr(data, "dtype"):
            data = xp.asarray(data)
        self._data = data
        self._grad = xp.zeros_like(data)
        self.name = name
        self.requires_grad = bool(requires_grad)
        self._hooks = {}
        self._uses = 0  # uses in the current forward not yet matched by a backward

    @property
    def data(self):
        """The parameter's array (NumPy or CuPy)."""
        return self._data

    @data.setter
    def data(self, value):
        if tuple(value.shape) != tuple(self._data.shape):
            raise ValueError(f"parameter {self.name!r} has shape {tuple(self._data.shape)} but the "
                             f"new data has shape {tuple(value.shape)}; assign an array of the same shape")
        self._data = value

    @property
    def grad(self):
        """The gradient array, same shape and dtype as ``data`` (or None when a user set it so)."""
        return self._grad

    @grad.setter
    def grad(self, value):
        if value is not None and (tuple(value.shape) != tuple(self._data.shape)
                                  or value.dtype != self._data.dtype):
            raise ValueError(f"parameter {self.name!r} is {tuple(self._data.shape)} {self._data.dtype} "
                             f"but the new grad is {tuple(value.shape)} {value.dtype}; "
                             f"assign an array of the parameter's shape and dtype")
        self._grad = value

    shape = property(lambda self: tuple(self._data.shape), doc="Shape of ``data``.")
    dtype = property(lambda self: self._data.dtype, doc="dtype of ``data``.")
    size = property(lambda self: int(self._data.size), doc="Number of elements.")
    ndim = property(lambda self: self._data.ndim, doc="Number of dimensions.")
    nbytes = property(lambda self: int(self._data.nbytes), doc="Bytes of ``data`` (not counting grad).")

    def register_hook(self, fn):
        """Call ``fn(param)`` each time this parameter's gradient for a backward is complete."""
        return add_hook(self._hooks, fn)

    def accumulate(self, g):
        """``grad += g`` in place (never rebinds ``grad``); no-op when frozen or grad is None."""
        if self.requires_grad and self._grad is not None:
            self._grad += g

    def _use(self):
        if self.requires_grad:
            self._uses += 1

    def _release(self):
        """One use's backward is done; fire the hooks when it was the last one."""
        if self._uses > 0:
            self._uses -= 1
            if self._uses == 0:
                for fn in list(self._hooks.values()):
                    fn(self)

    def _move(self, xp, dtype=None):
        """Rebind data and grad to module ``xp`` / ``dtype`` (keeps this object's identity)."""
        data = to_module(self._data, xp)
        grad = None if self._grad is None else to_module(self._grad, xp)
        if dtype is not None and data.dtype != dtype:
            data = data.astype(dtype)
            grad = None if grad is None else grad.astype(dtype)
        self._data, self._grad = data, grad

    def __repr__(self):
        flag = "" if self.requires_grad else ", requires_grad=False"
        return f"Parameter(name={self.name!r}, shape={self.shape}, dtype={self.dtype}{flag})"
