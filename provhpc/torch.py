"""PyTorch integration: one call to watch a (DDP) training, one to save checkpoints.

    import provhpc.torch as ptorch

    w = ptorch.watch(model, optimizer, data=[train_set], hyperparameters=hp)
    for epoch in range(epochs):
        with w.epoch(epoch):
            for x, y in loader:
                loss = loss_fn(model(x), y)
                loss.backward()
                optimizer.step()
                w.log(loss=loss, batch_size=len(x))  # kept on its device, read later
    ptorch.save(model.state_dict(), "ckpt.pt")   # entity derived from data + hyperparameters

What is recorded: the model as an entity (class, layers, parameter counts,
dtypes, devices, architecture text), the DDP world (size, rank, local rank,
backend, the rank's GPU index, UUID and name) as an entity, per-step values
given to ``log`` (metric ``<name>``, step = the watcher's step counter), per
epoch their mean (``epoch_<name>``), the learning rate (``lr``: at each
change seen by the optimizer hook and at every epoch end), samples and
throughput per epoch (from ``log(batch_size=...)``), and
checkpoints as generated entities with their content hash, derived from the
training data, the hyperparameters and the model.

Hot-path policy (what runs every step): ``torch`` is imported only here,
never by ``import provhpc``.  The model's ``forward`` is neither replaced nor
hooked (a forward hook alone moves every module call off PyTorch's fast
path); an optimizer step post-hook reads ``param_groups[0]["lr"]`` when it
is a Python number.
``log`` never calls ``.item()``, ``.cpu()``, ``float()`` or ``.tolist()`` on a
tensor: it keeps ``tensor.detach()`` (a scalar on its device) with the step,
time and activity of the call.  Pending values are read in one batch —
``torch.stack(values).tolist()``, one device-to-host synchronisation per
device — every ``every`` logged values (default 256), at each epoch end,
at ``flush()``/``close()`` and before a checkpoint is saved.  The records keep
the time of the ``log`` call, not of the read.  Without a running capture
agent ``watch`` registers no hooks and ``log`` returns at once.
"""

from __future__ import annotations

import atexit
import os
import time
from typing import Literal

from .capture import api
from .format import records as R
from .launch import session as _session

__all__ = ["MAX_LAYERS", "Watcher", "model_summary", "save", "watch", "world_info"]

MAX_LAYERS = 256  # leaf layers listed one by one; beyond that only counted
_watcher: Watcher | None = None  # the latest watcher: save() derives from it by default


def _torch():
    import torch  # the real torch: absolute import, this module is provhpc.torch

    return torch


def _entities(items, what):
    if items is None:
        return ()
    if isinstance(items, (api.Entity, str, os.PathLike)):
        items = (items,)
    out = []
    for e in items:
        if isinstance(e, api.Entity):
            out.append(e)
        elif isinstance(e, (str, os.PathLike)):
            out.append(api.data(e))
        else:
            raise ValueError(f"provhpc.torch: {what} must be provhpc entities or paths, got {e!r}")
    return tuple(out)


# ---------------------------------------------------------------------- descriptions
def model_summary(model) -> dict:
    """Class, parameter counts, dtypes, devices and leaf layers (metadata only, no data read)."""
    inner = getattr(model, "module", model)  # DistributedDataParallel / DataParallel
    params = list(inner.parameters())
    leaves = [(n, m) for n, m in inner.named_modules() if n and not any(True for _ in m.children())]
    doc = {
        "class": f"{type(inner).__module__}.{type(inner).__qualname__}",
        "wrapper": type(model).__name__ if inner is not model else "",
        "parameters": sum(p.numel() for p in params),
        "trainable_parameters": sum(p.numel() for p in params if p.requires_grad),
        "buffers": sum(b.numel() for b in inner.buffers()),
        "dtype": ",".join(sorted({str(p.dtype).replace("torch.", "") for p in params})),
        "device": ",".join(sorted({str(p.device) for p in params})),
        "layers": len(leaves),
    }
    for name, m in leaves[:MAX_LAYERS]:
        n = sum(p.numel() for p in m.parameters(recurse=False))
        doc[f"layer.{name}"] = f"{type(m).__name__} params={n}"
    return doc


def world_info(model=None) -> dict:
    """The DDP world of this process and the GPU its model sits on."""
    torch = _torch()
    doc = {"world_size": 1, "rank": 0, "backend": "none"}
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        doc.update(world_size=dist.get_world_size(), rank=dist.get_rank(),
                   backend=str(dist.get_backend()))
    from .launch import session

    s = session.current()
    doc["local_rank"] = s.ident.local_rank if s is not None else \
        int(os.environ.get("LOCAL_RANK", "0") or 0)
    device = None
    if model is not None:
        p = next(iter(model.parameters()), None)
        device = p.device if p is not None else None
    doc["device"] = str(device) if device is not None else "cpu"
    if device is not None and device.type == "cuda":
        doc.update(_cuda_device(torch, device))
    return doc


def _cuda_device(torch, device) -> dict:
    index = device.index if device.index is not None else torch.cuda.current_device()
    doc = {"gpu.index": index,
           "gpu.visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", "")}
    try:  # properties are host-side metadata: no synchronisation
        props = torch.cuda.get_device_properties(index)
        doc["gpu.name"] = props.name
        uuid = str(getattr(props, "uuid", "") or "")
        if uuid:
            doc["gpu.uuid"] = uuid if uuid.startswith(("GPU-", "MIG-")) else "GPU-" + uuid
    except Exception:  # an old torch or a driver without the field
        pass
    return doc


# ---------------------------------------------------------------------- the watcher
class Watcher:
    """Hooks on a model and optimizer, and the values logged per step (see the module doc)."""

    def __init__(self, model, optimizer=None, *, data=(), hyperparameters=None,
                 name: str = "model", every: int = 256):
        if not isinstance(every, int) or every <= 0:
            raise ValueError(f"provhpc.torch: every must be a positive int, got {every!r}")
        api.check_name(name, "model name")
        self.model, self.optimizer, self.name, self.every = model, optimizer, name, every
        self.step = 0  # values logged (training steps)
        self.optimizer_steps = 0
        self.samples = 0
        self.enabled = api.get_agent() is not None
        self._pending: list = []  # (name, step, t, activity, value: float or tensor)
        self._sums: dict[str, list] = {}  # this epoch: name -> [sum, count]
        self._lr = None
        self._hooks: list = []
        self.data = _entities(data, "data")
        if isinstance(hyperparameters, dict):
            hyperparameters = api.hyperparameters(hyperparameters)
        self.hyperparameters = _entities(hyperparameters, "hyperparameters")
        self.model_entity = api.Entity(f"model/{name}", "model", 0)
        self.world_entity = api.Entity("ddp/world", "distributed", 0)
        self.world: dict = {}
        if self.enabled:
            self._describe()
            if optimizer is not None:
                self._hooks.append(optimizer.register_step_post_hook(self._on_step))
            atexit.register(self.close)
            _session.on_shutdown(self.close)  # `provhpc run` shuts down before atexit

    def _describe(self) -> None:
        self.model_entity = api.data(f"model/{self.name}", kind="model",
                                     **model_summary(self.model))
        self.model_entity.attribute("architecture", repr(getattr(self.model, "module",
                                                                 self.model)))
        if self.optimizer is not None:
            opt = self.optimizer
            self.model_entity.attribute("optimizer", type(opt).__name__)
            defaults = {k: v for k, v in getattr(opt, "defaults", {}).items()
                        if isinstance(v, (int, float, str, bool)) or v is None}
            self.model_entity.attributes(**{f"optimizer.{k}": v for k, v in defaults.items()})
        self.world = world_info(self.model)
        self.world_entity = api.data("ddp/world", kind="distributed", **self.world)
        api.used(self.model_entity, self.world_entity)

    # --- hooks (hot path: Python numbers only)
    def _on_step(self, optimizer, _args, _kwargs):
        self.optimizer_steps += 1
        lr = optimizer.param_groups[0].get("lr")
        if lr.__class__ is float or lr.__class__ is int:
            if lr != self._lr:
                self._lr = lr
                self._pending.append(("lr", self.optimizer_steps, time.time_ns(),
                                      api.CURRENT.get(), float(lr)))

    # --- per step
    def log(self, step: int | None = None, *, batch_size: int = 0, **values) -> None:
        """Values of this training step (tensors stay on their device until a batched read).

        ``batch_size``: samples of this step (counted into the epoch's throughput).
        """
        if not self.enabled:
            return
        self.samples += batch_size
        if step is None:
            step = self.step
        self.step = step + 1
        t, aid = time.time_ns(), api.CURRENT.get()
        pending = self._pending
        for name, v in values.items():
            if v.__class__ is not float:
                v = self._keep(name, v)
            pending.append((name, step, t, aid, v))
        if len(pending) >= self.every:
            self.flush()

    def _keep(self, name, v):
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
        detach = getattr(v, "detach", None)
        if detach is None:
            raise ValueError(f"provhpc.torch: {name!r}: {type(v).__name__} is not a number "
                             "or tensor")
        v = detach()
        if v.dim():  # 0-d tensors stack as they are; else one value, computed on the device
            v = v.reshape(()) if v.numel() == 1 else v.float().mean()
        return v

    def flush(self) -> None:
        """Read the pending tensors (one batched transfer per device) and emit their records."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        values = [p[4] for p in pending]
        tensors: dict = {}
        for i, v in enumerate(values):
            if v.__class__ is not float:
                tensors.setdefault(v.device, []).append(i)
        if tensors:
            torch = _torch()
            for idx in tensors.values():
                read = torch.stack([values[i] for i in idx]).tolist()  # dtypes promote
                for i, x in zip(idx, read):
                    values[i] = float(x)
        agent = api.get_agent(start_child=False)
        if agent is None:
            return
        sums = self._sums
        for (name, step, t, aid, _), v in zip(pending, values):
            agent.emit(R.METRIC, R.V_FLOAT, 0, aid, 0, t, name, None, step, 0, v)
            if name != "lr":
                acc = sums.get(name)
                if acc is None:
                    sums[name] = [v, 1]
                else:
                    acc[0] += v
                    acc[1] += 1

    # --- per epoch
    def epoch(self, i: int, **params) -> _Epoch:
        """Epoch ``i``: ``with w.epoch(i):`` (or ``start()``/``end()``); flushes at its end."""
        return _Epoch(self, i, params)

    def _end_epoch(self, activity, index, t0, samples0) -> None:
        self.flush()
        lr = self.optimizer.param_groups[0].get("lr") if self.optimizer is not None else None
        if lr is not None and not isinstance(lr, (int, float)):
            lr = lr.detach().float().cpu().item()  # a tensor lr (capturable): once per epoch
        seconds = time.perf_counter() - t0
        samples = self.samples - samples0
        values = {f"epoch_{k}": s / n for k, (s, n) in self._sums.items() if n}
        values.update(epoch_seconds=seconds, samples=float(samples),
                      samples_per_second=samples / seconds if seconds > 0 else 0.0)
        if lr is not None:
            values["lr"] = float(lr)
        for k, v in values.items():
            activity.metric(k, v, step=index)
        self._sums = {}

    # --- checkpoints
    def save(self, obj, f, **attributes) -> api.Entity:
        """``torch.save(obj, f)`` and a checkpoint entity (see ``provhpc.torch.save``)."""
        return save(obj, f, watcher=self, **attributes)

    # --- lifecycle
    def close(self) -> None:
        """Flush pending values and remove the hooks; idempotent."""
        try:
            self.flush()
        except Exception:  # at exit, a broken device must not raise into the interpreter
            self._pending = []
        for h in self._hooks:
            h.remove()
        self._hooks = []
        if self.enabled:
            atexit.unregister(self.close)
            self.enabled = False

    def __enter__(self) -> Watcher:
        return self

    def __exit__(self, *exc) -> Literal[False]:
        self.close()
        return False


class _Epoch:
    __slots__ = ("watcher", "index", "activity", "_t0", "_samples0")

    def __init__(self, watcher, index, params):
        self.watcher, self.index = watcher, index
        self.activity = api.epoch(index, **params)

    def start(self) -> _Epoch:
        self.activity.start()
        self._t0, self._samples0 = time.perf_counter(), self.watcher.samples
        return self

    def end(self, status: str = "ok", error: BaseException | None = None) -> None:
        if self.watcher.enabled:
            self.watcher._end_epoch(self.activity, self.index, self._t0, self._samples0)
        self.activity.end(status, error)

    def __enter__(self) -> _Epoch:
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> Literal[False]:
        self.end("ok" if exc_type is None else "error", exc)
        return False


def watch(model, optimizer=None, *, data=(), hyperparameters=None, name: str = "model",
          every: int = 256) -> Watcher:
    """Watch ``model`` (plain or DDP-wrapped) and ``optimizer``; see the module docstring.

    ``data``: the training data (entities or paths) and ``hyperparameters``: an
    entity or a dict, from which checkpoints are derived.  ``every``: the number
    of logged values read per batched device-to-host transfer.
    """
    global _watcher
    w = Watcher(model, optimizer, data=data, hyperparameters=hyperparameters, name=name,
                every=every)
    _watcher = w
    return w


def save(obj, f, *, watcher: Watcher | None = None, data=None, hyperparameters=None,
         hash: bool = True, **attributes) -> api.Entity:
    """``torch.save(obj, f)``, recorded as a checkpoint entity generated by a task.

    The entity (kind ``checkpoint``, key = the path) carries the file's size
    and content hash (``hash``) and ``attributes``, and is derived from the
    training data, the hyperparameters and the model of ``watcher`` (default:
    the latest ``watch``), or from ``data``/``hyperparameters`` given here.
    """
    torch = _torch()
    w = watcher if watcher is not None else _watcher
    if w is not None and w.enabled:
        w.flush()
    sources = list(_entities(data, "data")) + list(_entities(hyperparameters, "hyperparameters"))
    if w is not None:
        if data is None:
            sources[:0] = w.data
        if hyperparameters is None:
            sources.extend(w.hyperparameters)
        if w.model_entity.id:
            sources.append(w.model_entity)
        attributes.setdefault("step", w.step)
        attributes.setdefault("optimizer_steps", w.optimizer_steps)
    if not isinstance(f, (str, os.PathLike)):
        torch.save(obj, f)
        return api.Entity("<stream>", "checkpoint", 0)
    with api.task("save_checkpoint", used=sources) as t:
        torch.save(obj, f)
        ckpt = api.data(f, kind="checkpoint", hash=hash, derived_from=sources, **attributes)
        t.generated(ckpt)
    return ckpt
