"""Containers and shape layers: Sequential, ModuleList, Residual, Flatten, Reshape, Identity."""
from ..module import Module


class ModuleList(Module):
    """A list of registered modules with no forward of its own."""

    def __init__(self, modules=()):
        super().__init__()
        for i, m in enumerate(modules):
            if not isinstance(m, Module):
                raise TypeError(f"{type(self).__name__} takes Modules, argument {i} is a {type(m).__name__}")
            self.append(m)

    def append(self, module):
        """Add ``module`` at the end; returns self."""
        self.add_module(str(len(self._modules)), module)
        return self

    def __getitem__(self, i):
        return list(self._modules.values())[i]

    def __len__(self):
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules.values())


class Sequential(ModuleList):
    """Applies its modules in order; backward runs them in reverse."""

    def __init__(self, *modules):
        super().__init__(modules)

    def forward(self, x):
        for m in self._modules.values():
            x = m(x)
        return x

    def _backward(self, dy):
        for m in reversed(list(self._modules.values())):
            dy = m.backward(dy)
        return dy


class Residual(Module):
    """y = fn(x) + shortcut(x) (shortcut defaults to the identity); fn must keep x's shape."""

    def __init__(self, fn, shortcut=None):
        super().__init__()
        self.fn = fn
        self.shortcut = shortcut

    def forward(self, x):
        y = self.fn(x)
        s = x if self.shortcut is None else self.shortcut(x)
        if y.shape != s.shape:
            raise ValueError(f"Residual branch gives shape {tuple(y.shape)} but the shortcut gives "
                             f"{tuple(s.shape)}; add a shortcut module that maps one to the other")
        return y + s

    def _backward(self, dy):
        ds = dy if self.shortcut is None else self.shortcut.backward(dy)
        return self.fn.backward(dy) + ds


class Flatten(Module):
    """x (N, d1, d2, ...) -> (N, d1*d2*...)."""

    def forward(self, x):
        self._save(x.shape)
        return x.reshape(x.shape[0], -1)

    def _backward(self, dy):
        (shape,) = self._pop()
        return dy.reshape(shape)


class Reshape(Module):
    """x (N, ...) -> (N, *shape), e.g. flat 8x8 images (N, 64) -> (N, 1, 8, 8)."""

    def __init__(self, *shape):
        super().__init__()
        self.shape = tuple(int(s) for s in shape)

    def forward(self, x):
        self._save(x.shape)
        return x.reshape((x.shape[0],) + self.shape)

    def _backward(self, dy):
        (shape,) = self._pop()
        return dy.reshape(shape)

    def extra_repr(self):
        return ", ".join(map(str, self.shape))


class Identity(Module):
    """y = x."""

    def forward(self, x):
        return x

    def _backward(self, dy):
        return dy
