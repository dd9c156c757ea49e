"""OffloadManager: large parameters live in host memory and visit the device only while a module uses them.

Parameters of at least ``threshold_bytes`` move to the host tier (CuPy pinned
memory on a GPU; plain NumPy standing in on a CPU-only machine, where the
"device" copies are separate arrays so the budget and the copies are real;
memory-mapped files with ``disk_dir``). Outside a module's forward and backward
``p.data`` and ``p.grad`` are these host arrays, so anything that works on
parameters between steps (the optimizer, the gradient exchange, checkpoints)
works on the host copies: the update of offloaded parameters runs on the host,
ZeRO-Offload style, unless ``optimizer_on='device'``.

Module hooks do the traffic. Before a module's forward (and backward) its
offloaded parameters are copied into device buffers drawn from a pool that
never exceeds ``device_budget_bytes``, and ``p.data`` points at them; the
parameters of the next ``prefetch`` modules (in the order recorded during the
previous pass) are copied ahead on a copy stream (GPU) or a copy thread (CPU).
In backward each parameter also gets a zeroed device gradient; after the
module's backward, and when the parameter's gradient is complete, the device
gradient is added into the host gradient (which the DistributedOptimizer's
bucket then reduces). Unused device copies stay cached until the space is
needed or the next forward starts (the optimizer may have changed the host
values in between); a module called on its own, outside the model's forward
and backward, copies its parameters afresh.

Create the manager after casting the model (amp) and before the
DistributedOptimizer or ShardedOptimizer, so its gradient hooks run first.
"""
import queue
import threading
import time

import numpy

from ..backend import pinned
from ..backend.xp import asnumpy, cupy_module, is_cupy
from ..errors import MpidpError
from .disk import DiskTier

try:  # the timeline is optional: spans cost nothing when it is off or absent
    from ..timeline import span as _span
except ImportError:  # pragma: no cover - until mpidp.timeline is installed
    import contextlib
    _span = lambda *a, **k: contextlib.nullcontext()  # noqa: E731


class OffloadBudgetError(MpidpError, ValueError):
    """A module's offloaded parameters (and gradients) do not fit in ``device_budget_bytes``."""


# -- copies --------------------------------------------------------------------------------------

class _Done:
    """Ticket of a copy that already finished."""

    @staticmethod
    def done():
        return True

    @staticmethod
    def wait():
        return None


_DONE = _Done()


class _SyncCopies:
    """CPU stand-in: copies run in the calling thread (prefetch then only reorders them)."""

    kind = "sync"

    def __init__(self):
        self.seconds = {"h2d": 0.0, "d2h": 0.0}  # time spent copying, per direction

    def h2d(self, dst, src, fence=None):
        t0 = time.perf_counter()
        numpy.copyto(dst, src)
        self.seconds["h2d"] += time.perf_counter() - t0
        return _DONE

    def d2h(self, dst, src):
        t0 = time.perf_counter()
        numpy.copyto(dst, src)
        self.seconds["d2h"] += time.perf_counter() - t0

    def add_d2h(self, host, dev):
        t0 = time.perf_counter()
        host += dev
        self.seconds["d2h"] += time.perf_counter() - t0

    def fence(self):
        return None

    def close(self):
        pass


class _ThreadTicket:
    __slots__ = ("event",)

    def __init__(self):
        self.event = threading.Event()

    def done(self):
        return self.event.is_set()

    def wait(self):
        self.event.wait()


class _ThreadCopies(_SyncCopies):
    """CPU stand-in with overlap: host->device copies run on a background thread (NumPy drops the GIL)."""

    kind = "thread"

    def __init__(self):
        super().__init__()
        self._queue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="mpidp-offload-copy", daemon=True)
        self._thread.start()

    def _loop(self):
        while True:
            job = self._queue.get()
            if job is None:
                return
            dst, src, ticket = job
            t0 = time.perf_counter()
            numpy.copyto(dst, src)
            self.seconds["h2d"] += time.perf_counter() - t0
            ticket.event.set()

    def h2d(self, dst, src, fence=None):
        ticket = _ThreadTicket()
        self._queue.put((dst, src, ticket))
        return ticket

    def close(self):
        self._queue.put(None)


class _EventTicket:
    __slots__ = ("event",)

    def __init__(self, event):
        self.event = event

    def done(self):
        return self.event.done

    def wait(self):
        self.event.synchronize()


class _StreamCopies:
    """GPU: copies on a separate non-blocking CUDA stream from pinned host memory; timed with events."""

    kind = "stream"

    def __init__(self, cp):
        self.cp = cp
        self.stream = cp.cuda.Stream(non_blocking=True)
        self._timed = []   # (direction, start, end) events not yet summed
        self._seconds = {"h2d": 0.0, "d2h": 0.0}

    @property
    def seconds(self):
        """Copy-stream time per direction, from CUDA events (synchronises the copy stream)."""
        if self._timed:
            self._timed[-1][2].synchronize()
            for direction, a, b in self._timed:
                self._seconds[direction] += self.cp.cuda.get_elapsed_time(a, b) / 1e3
            self._timed = []
        return self._seconds

    def _timed_copy(self, direction, fn):
        start, end = self.cp.cuda.Event(), self.cp.cuda.Event()
        start.record(self.stream)
        fn()
        end.record(self.stream)
        self._timed.append((direction, start, end))
        return end

    def h2d(self, dst, src, fence=None):
        if fence is not None:  # the buffer's last reader on the compute stream must be done with it
            self.stream.wait_event(fence)
        return _EventTicket(self._timed_copy("h2d", lambda: dst.set(src, stream=self.stream)))

    def _after_compute(self):
        self.stream.wait_event(self.cp.cuda.get_current_stream().record())

    def d2h(self, dst, src):
        self._after_compute()
        self._timed_copy("d2h", lambda: src.get(stream=self.stream, out=dst, blocking=False))
        self.stream.synchronize()

    def add_d2h(self, host, dev):
        raw = pinned.pool.acquire(dev.nbytes)
        try:
            staging = pinned.staged(raw, dev.nbytes, dev.dtype, dev.shape)
            self.d2h(staging, dev)
            host += staging
        finally:
            pinned.pool.release(raw)

    def fence(self):
        return self.cp.cuda.get_current_stream().record()

    def close(self):
        self.stream.synchronize()


# -- the device side -----------------------------------------------------------------------------

class _DevicePool:
    """Device buffers by size; everything it holds (in use or free) stays within ``budget`` bytes."""

    def __init__(self, alloc, budget):
        self._alloc, self.budget = alloc, int(budget)
        self._free = {}          # nbytes -> [(buffer, fence)]
        self.allocated = 0       # bytes of every buffer this pool holds
        self.in_use = 0
        self.peak = 0            # high-water mark of ``allocated``
        self.peak_in_use = 0

    def take(self, nbytes):
        """(buffer, fence) of exactly ``nbytes``, or None when it would not fit in the budget."""
        free = self._free.get(nbytes)
        if free:
            item = free.pop()
        else:
            for size in sorted(self._free, reverse=True):  # drop idle buffers of other sizes first
                while self._free[size] and self.allocated + nbytes > self.budget:
                    self._free[size].pop()
                    self.allocated -= size
            if self.allocated + nbytes > self.budget:
                return None
            item = (self._alloc(nbytes), None)
            self.allocated += nbytes
            self.peak = max(self.peak, self.allocated)
        self.in_use += nbytes
        self.peak_in_use = max(self.peak_in_use, self.in_use)
        return item

    def give(self, buf, fence):
        self._free.setdefault(buf.nbytes, []).append((buf, fence))
        self.in_use -= buf.nbytes


class _Entry:
    """One offloaded parameter: its device copy (if any), pins, and the host arrays held while pinned."""

    __slots__ = ("param", "name", "nbytes", "dev", "buf", "fence", "src", "epoch", "ticket", "pins",
                 "prefetched", "host_data", "grad", "grad_buf", "host_grad", "dirty", "last_used")

    def __init__(self, param, name):
        self.param, self.name, self.nbytes = param, name, param.nbytes
        self.dev = self.buf = self.fence = self.src = self.ticket = None
        self.epoch, self.pins, self.prefetched, self.last_used = -1, 0, False, 0
        self.host_data = self.grad = self.grad_buf = self.host_grad = None
        self.dirty = False

    def view(self, buf):
        p = self.param
        return buf.view(p.dtype).reshape(p.shape)


class OffloadManager:
    """Keep parameters >= ``threshold_bytes`` in host memory and stream them through a device budget.

    ``prefetch``: how many modules ahead to copy (0: only on demand).
    ``optimizer_on``: 'host' (update offloaded parameters where they live) or
    'device' (stream parameter, gradient and state through the budget for the
    update; wrap the optimizer with ``wrap_optimizer``). ``disk_dir``: keep
    offloaded parameters and their optimizer state in memory-mapped files there.
    ``copies``: 'sync' or 'thread' on CPU (GPU always uses a copy stream).
    """

    def __init__(self, model, device_budget_bytes, threshold_bytes=1 << 20, prefetch=1, optimizer_on="host",
                 disk_dir=None, copies=None):
        if optimizer_on not in ("host", "device"):
            raise ValueError(f"optimizer_on must be 'host' or 'device', got {optimizer_on!r}")
        if int(prefetch) < 0:
            raise ValueError(f"prefetch must be >= 0 modules, got {prefetch}")
        self.model, self.budget = model, int(device_budget_bytes)
        self.threshold, self.prefetch, self.optimizer_on = int(threshold_bytes), int(prefetch), optimizer_on
        params = list(model.parameters())
        self.gpu = any(is_cupy(p.data) for p in params)
        cp = cupy_module() if self.gpu else None
        if self.gpu:
            self._copies = _StreamCopies(cp)
            alloc = lambda n: cp.empty(n, dtype=numpy.uint8)  # noqa: E731
        else:
            copies = copies or "sync"  # measured: a copy thread costs more than it hides at CPU memcpy speed
            if copies not in ("sync", "thread"):
                raise ValueError(f"copies must be 'sync' or 'thread' on a CPU, got {copies!r}")
            self._copies = _ThreadCopies() if copies == "thread" else _SyncCopies()
            alloc = lambda n: numpy.empty(n, dtype=numpy.uint8)  # noqa: E731
        self.pool = _DevicePool(alloc, self.budget)
        self.disk = DiskTier(disk_dir) if disk_dir is not None else None
        self._entries, self._owned, self._modules, self._names = {}, {}, [], {}
        for mname, module in model.named_modules():
            mine = []
            for pname, p in module.named_parameters(recurse=False):
                if p.nbytes < self.threshold:
                    continue
                entry = self._entries.get(id(p))
                if entry is None:
                    entry = self._entries[id(p)] = self._offload(p, f"{mname}.{pname}" if mname else pname)
                mine.append(entry)
            if mine:
                self._owned[id(module)] = mine
                self._names[id(module)] = mname or type(module).__name__
                self._modules.append(module)
        self._check_budget()
        self._index = {id(m): i for i, m in enumerate(self._modules)}
        self.epoch, self._tick = 0, 0
        self._trace, self._rec, self._pos, self._follow = [], [], 0, False
        self._state_homes = {}  # (id(param), key) -> host array of an optimizer state entry
        self._wrapped = False
        self.stats = {"h2d_bytes": 0, "d2h_bytes": 0, "h2d_copies": 0, "d2h_copies": 0, "wait_s": 0.0,
                      "issue_s": 0.0, "demand_fetches": 0, "prefetches": 0, "prefetch_hits": 0, "cache_hits": 0,
                      "evictions": 0, "skipped_prefetches": 0}
        self._in_pass = False  # inside the model's forward or backward: copies of this pass are current
        self._hooks = [model.register_forward_pre_hook(self._on_pass),
                       model.register_forward_hook(lambda m, x, y: self._set_in_pass(False)),
                       model.register_backward_pre_hook(lambda m, dy: self._set_in_pass(True)),
                       model.register_backward_hook(lambda m, dx: self._set_in_pass(False))]
        for module in self._modules:
            self._hooks += [module.register_forward_pre_hook(lambda m, x: self._pin(m, False)),
                            module.register_forward_hook(lambda m, x, y: self._unpin(m, False)),
                            module.register_backward_pre_hook(lambda m, dy: self._pin(m, True)),
                            module.register_backward_hook(lambda m, dx: self._unpin(m, True))]
        for entry in self._entries.values():
            p = entry.param
            if p._hooks:  # gradient hooks run in registration order: ours must add the device part first
                raise MpidpError(f"parameter {entry.name!r} already has gradient hooks; create the OffloadManager "
                                 f"before the DistributedOptimizer or ShardedOptimizer")
            if p.requires_grad:
                self._hooks.append(p.register_hook(self._grad_ready))

    @staticmethod
    def required_budget(model, threshold_bytes=1 << 20):
        """The smallest ``device_budget_bytes`` that works: the largest module's offloaded parameters + gradients."""
        need = 0
        for module in model.modules():
            ps = [p for _, p in module.named_parameters(recurse=False) if p.nbytes >= threshold_bytes]
            need = max(need, sum(p.nbytes * (2 if p.requires_grad else 1) for p in ps))
        return need

    # -- setup ----------------------------------------------------------------------------------------
    def _host_array(self, name, shape, dtype, on_disk):
        if on_disk and self.disk is not None:
            return self.disk.empty(name, shape, dtype)
        nbytes = int(numpy.prod(shape, dtype=numpy.int64)) * numpy.dtype(dtype).itemsize
        return pinned.empty_pinned(nbytes).view(dtype).reshape(shape)

    def _offload(self, p, name):
        """Move ``p`` (data and grad) into the host tier; returns its entry."""
        host = self._host_array(name, p.shape, p.dtype, on_disk=True)
        host[...] = asnumpy(p.data)
        p.data = host
        if p.grad is not None:
            grad = self._host_array(name + ".grad", p.shape, p.dtype, on_disk=False)
            grad[...] = asnumpy(p.grad)
            p.grad = grad
        return _Entry(p, name)

    def _need(self, module, backward):
        return sum(e.nbytes * (2 if backward and e.param.requires_grad else 1) for e in self._owned[id(module)])

    def _check_budget(self):
        """Fail at construction when the largest module's backward (parameters + gradients) cannot fit."""
        if not self._modules:
            return
        module = max(self._modules, key=lambda m: self._need(m, True))
        need = self._need(module, True)
        if need > self.budget:
            names = [e.name for e in self._owned[id(module)]]
            raise OffloadBudgetError(
                f"module {self._names[id(module)]!r} needs {need} bytes on the device in backward (parameters "
                f"{names} and their gradients) but device_budget_bytes is {self.budget}; raise the budget to at "
                f"least {need} or split the module")

    # -- the pass -----------------------------------------------------------------------------------
    def _on_pass(self, model, x):
        """A new forward of the whole model: cached copies may be stale; last pass's order is the trace."""
        if self.optimizer_on == "device" and not self._wrapped:
            raise MpidpError("OffloadManager(optimizer_on='device') updates offloaded parameters only through "
                             "manager.wrap_optimizer(optimizer); wrap it before building the DistributedOptimizer")
        if any(e.pins for e in self._entries.values()):
            self._recover()
        self.epoch += 1
        self._in_pass = True
        if self._rec:
            self._trace = self._rec
        self._rec, self._pos = [], 0
        self._follow = bool(self._trace)

    def _set_in_pass(self, value):
        self._in_pass = value

    def _record(self, module):
        index = self._index[id(module)]
        self._rec.append(index)
        if self._follow and self._pos < len(self._trace) and self._trace[self._pos] == index:
            self._pos += 1
        else:
            self._follow = False

    def _pin(self, module, backward):
        entries = self._owned[id(module)]
        if not self._in_pass and not any(e.pins for e in self._entries.values()):
            self.epoch += 1  # a module called on its own: the host values may have changed since the last pass
        self._record(module)
        protect = set(map(id, entries))
        for e in entries:
            self._fetch(e, protect, True, module)
        self._prefetch_ahead(protect)
        self._tick += 1
        for e in entries:
            p = e.param
            e.pins += 1
            e.last_used = self._tick
            if e.pins == 1:
                self._wait(e)
                e.host_data = p.data
                p.data = e.dev
            if backward and p.requires_grad:
                if e.grad is None and p.grad is not None:
                    item = self._alloc(e.nbytes, protect)
                    if item is None:
                        raise self._budget_error(module, e)
                    e.grad_buf, _ = item
                    e.grad = e.view(e.grad_buf)
                    e.grad.fill(0)
                    e.host_grad = p.grad
                    p.grad = e.grad
                e.dirty = e.grad is not None

    def _unpin(self, module, backward):
        for e in self._owned[id(module)]:
            self._unpin_entry(e, backward)

    def _unpin_entry(self, e, backward):
        if backward and e.dirty:
            self._flush(e)
        e.pins -= 1
        if e.pins == 0:
            p = e.param
            p.data, e.host_data = e.host_data, None
            e.fence = self._copies.fence()
            if e.grad is not None:
                p.grad, e.host_grad = e.host_grad, None
                self.pool.give(e.grad_buf, self._copies.fence())
                e.grad = e.grad_buf = None

    def _recover(self):
        """Unpin what a pass that raised left pinned (a module's forward or backward never ended: an
        out-of-memory a batch-size search caught, a user's assert): its parameters and gradients point
        at the host arrays again, and its device memory counts as free."""
        for e in self._entries.values():
            if e.pins:
                if e.grad is not None and e.param.grad is not e.grad:  # rebound since (a DistributedOptimizer's
                    e.host_grad = e.param.grad                         # bucket view): that binding stays
                e.pins = 1
                self._unpin_entry(e, e.dirty)

    def _grad_ready(self, param):
        e = self._entries[id(param)]
        if e.dirty:
            self._flush(e)

    def _flush(self, e):
        """host gradient += device gradient; the device gradient restarts from zero."""
        self._copies.add_d2h(e.host_grad, e.grad)
        e.grad.fill(0)
        e.dirty = False
        self.stats["d2h_bytes"] += e.nbytes
        self.stats["d2h_copies"] += 1

    # -- residency ----------------------------------------------------------------------------------
    def _valid(self, e):
        return e.dev is not None and e.epoch == self.epoch

    def _fetch(self, e, protect, demand, module=None):
        """Start copying ``e`` to the device unless a current copy is there; False when it does not fit."""
        if self._valid(e):
            if demand:
                self.stats["prefetch_hits" if e.prefetched else "cache_hits"] += 1
                e.prefetched = False
            return True
        if e.dev is None:
            item = self._alloc(e.nbytes, protect)
            if item is None:
                if demand:
                    raise self._budget_error(module, e)
                return False
            e.buf, e.fence = item
            e.dev = e.view(e.buf)
        src = e.param.data  # not pinned (a pinned entry is always valid): the host array
        t0 = time.perf_counter()
        with _span("offload h2d", "copy", param=e.name, bytes=e.nbytes):
            e.ticket = self._copies.h2d(e.dev, src, e.fence)
        self.stats["issue_s"] += time.perf_counter() - t0  # the whole copy when copies are synchronous
        e.src, e.epoch, e.prefetched = src, self.epoch, not demand
        self.stats["h2d_bytes"] += e.nbytes
        self.stats["h2d_copies"] += 1
        self.stats["demand_fetches" if demand else "prefetches"] += 1
        return True

    def _wait(self, e):
        ticket, e.ticket = e.ticket, None
        if ticket is not None and not ticket.done():
            t0 = time.perf_counter()
            with _span("offload wait", "wait", param=e.name):
                ticket.wait()
            self.stats["wait_s"] += time.perf_counter() - t0

    def _prefetch_ahead(self, protect):
        if not (self.prefetch and self._follow):
            return
        window = []
        for index in self._trace[self._pos:self._pos + self.prefetch]:
            window += self._owned[id(self._modules[index])]
        keep = protect | set(map(id, window))
        for e in window:
            if not self._fetch(e, keep, False):
                self.stats["skipped_prefetches"] += 1
                return

    def _alloc(self, nbytes, protect):
        """A device buffer of ``nbytes``, evicting idle copies (stale first, then least recently used)."""
        while True:
            item = self.pool.take(nbytes)
            if item is not None:
                return item
            idle = [e for e in self._entries.values()
                    if e.dev is not None and e.pins == 0 and id(e) not in protect]
            if not idle:
                return None
            victim = min(idle, key=lambda e: (e.epoch == self.epoch, e.last_used))
            self._evict(victim)

    def _evict(self, e):
        self._wait(e)
        self.pool.give(e.buf, e.fence)
        e.dev = e.buf = e.fence = e.src = None
        e.prefetched = False
        self.stats["evictions"] += 1

    def _budget_error(self, module, e):
        pinned_now = sorted({e2.name for e2 in self._entries.values() if e2.pins})
        return OffloadBudgetError(
            f"parameter {e.name!r} of module {self._names.get(id(module), '?')!r} ({e.nbytes} bytes) does not fit "
            f"in device_budget_bytes={self.budget} while {pinned_now} are in use by running modules "
            f"({self.pool.in_use} bytes); raise the budget")

    # -- the optimizer ------------------------------------------------------------------------------
    def wrap_optimizer(self, optimizer):
        """An optimizer wrapper that keeps offloaded state in the host tier and honours ``optimizer_on``."""
        self._wrapped = True
        return OffloadOptimizer(optimizer, self)

    def is_offloaded(self, p):
        """True when ``p`` lives in the host tier."""
        return id(p) in self._entries and self._entries[id(p)].param is p

    def host_array(self, p):
        """The host-tier array of an offloaded parameter (also while a module has it on the device)."""
        e = self._entries[id(p)]
        return e.host_data if e.pins else p.data

    def _place_state(self, state):
        """Keep the optimizer state of offloaded parameters in the host tier (pinned or on disk)."""
        for e in self._entries.values():
            st = state.get(e.param)
            if not st:
                continue
            for key, value in st.items():
                if not hasattr(value, "shape") or value.ndim == 0:
                    continue
                home = self._state_homes.get((id(e.param), key))
                if home is None or home is not value:
                    if home is None:
                        home = self._host_array(f"{e.name}.{key}", value.shape, value.dtype, on_disk=True)
                        self._state_homes[(id(e.param), key)] = home
                    home[...] = asnumpy(value)
                    st[key] = home

    def _device_step(self, p, state, step):
        """Run ``step()`` with ``p``'s data, gradient and state arrays copied into device buffers."""
        st = state.get(p, {})
        keys = [k for k, v in st.items() if hasattr(v, "shape") and v.ndim > 0]
        hosts = [p.data, p.grad] + [st[k] for k in keys]
        need = sum(h.nbytes for h in hosts)
        items = []
        for h in hosts:
            item = self._alloc(h.nbytes, set())
            if item is None:
                for buf, fence in items:
                    self.pool.give(buf, fence)
                raise OffloadBudgetError(
                    f"the device update of {self._entries[id(p)].name!r} needs {need} bytes (parameter, gradient and "
                    f"{len(keys)} state arrays) but device_budget_bytes is {self.budget}; raise the budget or use "
                    f"optimizer_on='host'")
            items.append(item)
        devs = [buf.view(h.dtype).reshape(h.shape) for (buf, _), h in zip(items, hosts)]
        t0 = time.perf_counter()
        for d, h, (_, fence) in zip(devs, hosts, items):
            self._copies.h2d(d, h, fence).wait()
        self.stats["wait_s"] += time.perf_counter() - t0
        self.stats["h2d_bytes"] += need
        self.stats["h2d_copies"] += len(hosts)
        p.data, p.grad = devs[0], devs[1]
        for k, d in zip(keys, devs[2:]):
            st[k] = d
        try:
            step()
        finally:
            p.data, p.grad = hosts[0], hosts[1]
            for k, h in zip(keys, hosts[2:]):
                st[k] = h
        for i in [0] + list(range(2, len(hosts))):  # the gradient does not change
            self._copies.d2h(hosts[i], devs[i])
            self.stats["d2h_bytes"] += hosts[i].nbytes
            self.stats["d2h_copies"] += 1
        fence = self._copies.fence()
        for buf, _ in items:
            self.pool.give(buf, fence)

    # -- reporting and teardown -------------------------------------------------------------------
    def statistics(self):
        """Bytes and seconds of copies each way, time compute waited for them, share of host->device copy
        time hidden behind compute, achieved GB/s, device high-water marks."""
        s = dict(self.stats)
        seconds = self._copies.seconds
        s["h2d_s"], s["d2h_s"] = seconds["h2d"], seconds["d2h"]
        s["copy_s"] = s["h2d_s"] + s["d2h_s"]
        # compute is held up by host->device copies while it issues them (all of a synchronous copy) and
        # while it waits for them; device->host gradient copies are synchronous and never hidden
        s["exposed_s"] = s["wait_s"] + s["issue_s"]
        s["hidden_fraction"] = min(1.0, max(0.0, 1.0 - s["exposed_s"] / s["h2d_s"])) if s["h2d_s"] > 0 else 0.0
        s["h2d_gbps"] = s["h2d_bytes"] / s["h2d_s"] / 1e9 if s["h2d_s"] > 0 else 0.0
        s["d2h_gbps"] = s["d2h_bytes"] / s["d2h_s"] / 1e9 if s["d2h_s"] > 0 else 0.0
        s["peak_device_bytes"] = self.pool.peak
        s["peak_in_use_bytes"] = self.pool.peak_in_use
        s["device_bytes"] = self.pool.allocated
        s["budget_bytes"] = self.budget
        s["host_bytes"] = sum(e.nbytes for e in self._entries.values())
        s["offloaded_params"] = len(self._entries)
        s["copies"] = self._copies.kind
        return s

    def reset_statistics(self):
        for key in self.stats:
            self.stats[key] = 0.0 if key.endswith("_s") else 0
        seconds = self._copies.seconds
        for key in seconds:
            seconds[key] = 0.0
        self.pool.peak, self.pool.peak_in_use = self.pool.allocated, self.pool.in_use

    def close(self):
        """Remove the hooks and stop the copy thread (parameters stay in the host tier)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._copies.close()

    def __repr__(self):
        return (f"OffloadManager({len(self._entries)} parameters, {sum(e.nbytes for e in self._entries.values())} "
                f"bytes on the host, budget {self.budget} bytes, prefetch={self.prefetch}, "
                f"optimizer_on={self.optimizer_on!r}, copies={self._copies.kind!r})")


class _Only:
    """Context: each param group holds only the parameters ``keep(p)`` accepts."""

    def __init__(self, groups, keep):
        self.groups, self.keep, self.saved = groups, keep, None

    def __enter__(self):
        self.saved = [g["params"] for g in self.groups]
        for g in self.groups:
            g["params"] = [p for p in g["params"] if self.keep(p)]

    def __exit__(self, *exc):
        for g, ps in zip(self.groups, self.saved):
            g["params"] = ps


class OffloadOptimizer:
    """``manager.wrap_optimizer(opt)``: the optimizer's state of offloaded parameters lives in the host tier,
    and with ``optimizer_on='device'`` each offloaded parameter is updated on the device, one at a time."""

    def __init__(self, optimizer, manager):
        self.optimizer, self.manager = optimizer, manager

    def step(self):
        m, inner = self.manager, self.optimizer
        inner.init_state()  # state exists before the first update, so it can be placed in the host tier
        m._place_state(inner.state)
        if m.optimizer_on == "host":
            with _span("optimizer step (host)", "optim"):
                inner.step()
            return
        offloaded = [p for g in inner.param_groups for p in g["params"]
                     if m.is_offloaded(p) and p.grad is not None and p.requires_grad]
        ids = set(map(id, offloaded))
        with _Only(inner.param_groups, lambda p: id(p) not in ids):
            inner.step()
        for p in offloaded:
            with _span("optimizer step (device)", "optim", param=m._entries[id(p)].name):
                with _Only(inner.param_groups, lambda q, p=p: q is p):
                    m._device_step(p, inner.state, inner.step)

    def zero_grad(self):
        self.optimizer.zero_grad()

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @property
    def state(self):
        return self.optimizer.state

    def init_state(self):
        self.optimizer.init_state()
        self.manager._place_state(self.optimizer.state)

    def state_dict(self):
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict):
        self.optimizer.load_state_dict(state_dict)
        self.manager._place_state(self.optimizer.state)

    def __repr__(self):
        return f"OffloadOptimizer({self.optimizer!r}, optimizer_on={self.manager.optimizer_on!r})"
