"""The capture API.  Every call is a cheap no-op while no agent runs.

Instruments: ``task``, ``stage``, ``epoch`` (activities: context manager,
decorator, or explicit ``start()``/``end()``), ``metric``, ``hyperparameters``,
``data`` (entities), ``attribute``.  Misuse (an empty or non-string name, an
``end`` without a ``start``, a non-entity in ``used``) raises ``ValueError``
where it is written, with capture on and off alike.  Data never raises: values
are coerced by the documented rules (docs/format.md, "Values"), and a metric
point whose value is not a number or whose step is not an integer is dropped
and counted as ``bad_value``.
"""

from __future__ import annotations

import contextvars
import functools
import hashlib
import operator
import os
import struct
import threading
import time
from typing import Any, Literal

from ..format import records as R
from .agent import Agent, start_worker_agent

__all__ = [
    "CURRENT", "Activity", "Entity", "attach_child", "attribute", "check_name", "child_pending",
    "data", "epoch", "file_hash", "generated", "get_agent", "hyperparameters", "metric",
    "set_agent", "stage", "task", "used"
]

_agent = None  # the process's Agent, set by provhpc.init()
_get_ident = threading.get_ident
_fork_info = None  # in a forked child: what it needs to start its own agent lazily
CURRENT = contextvars.ContextVar("provhpc_activity", default=0)  # the id of the current activity
_time_ns = time.time_ns
_NO_STEP = R.NO_STEP
_METRIC, _V_FLOAT, _ATTRIBUTE = R.METRIC, R.V_FLOAT, R.ATTRIBUTE

ROLE_ATTRIBUTE, ROLE_PARAMETER, ROLE_GENERATED = 0, 1, 2  # ``ref`` of ATTRIBUTE records

_fast: Any  # the C module (no type stub: its functions are described in _fast.c)
try:  # the owner thread's hot path of activities and values in C (provhpc/_fast.c)
    from . import _fast  # type: ignore[attr-defined,no-redef]
except ImportError:  # not built (no compiler): the Python path below does the same
    _fast = None
_c_start, _c_values = (_fast.start, _fast.values) if _fast is not None else (None, None)


def get_agent(start_child: bool = True) -> Agent | None:
    """This process's agent, or None when capture is off.

    In a forked child of a rank the child's own agent is started on first use
    (``start_child=False``: only look)."""
    agent = _agent
    if agent is None and start_child and _fork_info is not None:
        agent = _start_child_agent()
    return agent


def set_agent(agent: Agent | None) -> Agent | None:
    """Make ``agent`` (or None: capture off) this process's agent; returns the previous one."""
    global _agent
    previous, _agent = _agent, agent
    return previous


def check_name(name: Any, what: str = "name") -> None:
    """Raise ValueError unless ``name`` is a non-empty str (``what`` names it)."""
    if name.__class__ is not str or not name:
        raise ValueError(f"provhpc: {what} must be a non-empty string, got {name!r}")


# ---------------------------------------------------------------------- values
def _last_frame(error: BaseException) -> str:
    """``file:line in function`` of the innermost frame of ``error``'s traceback, or ''."""
    tb = error.__traceback__
    if tb is None:
        return ""
    while tb.tb_next is not None:
        tb = tb.tb_next
    code = tb.tb_frame.f_code
    return f"{code.co_filename}:{tb.tb_lineno} in {code.co_name}"


def _items(values: dict[str, Any]) -> list[tuple[str, Any]]:
    """Encoded (key, value) pairs; nested mappings flattened to dotted keys."""
    out: list[tuple[str, Any]] = []
    for key, value in values.items():
        if key.__class__ is not str or not key:
            raise ValueError(f"provhpc: attribute names must be non-empty strings, got {key!r}")
        if isinstance(value, dict):  # flatten stops at its depth: no recursion on cycles
            out.extend(R.flatten(value, key + ".").items())
        else:
            out.append((key, value))
    return out


def _check_keys(values: dict[str, Any]) -> None:
    """Capture off (or nothing to attach to): raise for the keys what ``_items`` would."""
    for key in values:
        if key.__class__ is not str or not key:
            raise ValueError(f"provhpc: attribute names must be non-empty strings, got {key!r}")


def _check_entities(entities: Any) -> None:
    """Capture off: raise for ``entities`` what ``_entity_id`` would, creating nothing."""
    for e in entities:
        if isinstance(e, Entity):
            continue
        if isinstance(e, (str, os.PathLike)):
            check_name(os.fspath(e) if isinstance(e, os.PathLike) else e, "data identity")
            continue
        _entity_id(e)  # raises: not an entity


def _value_rows(agent: Agent, owner: int, role: int, t: int, values: dict[str, Any]) -> list[Any]:
    """Attribute rows for ``values``, by the one set of coercion rules (``records.coerce``).

    Encoded here, outside any lock: a value's ``repr`` may call provhpc.
    """
    h, max_string, coerce = agent.h_attr, agent.max_string, R.coerce
    rows = []
    for key, value in _items(values):
        vtype, ival, fval, text, flags = coerce(value, max_string)
        rows.append((h[vtype] | flags << 16, owner, role, t, key, text, _NO_STEP, ival, fval))
    return rows


def _flat_values(agent: Agent, owner: int, role: int, t: int, values: dict[str, Any],
                 flat: list[Any]) -> bool:
    """Append resolved rows of plain values (float, int, bool, interned str) to ``flat``.

    False when a key or string is new or a value needs the coercion rules:
    the caller then takes the general path (``_value_rows`` + ``Agent.write``).
    The cases taken here (and in ``_fast.c``'s ``value_records``) are exactly the
    first branches of ``records.coerce``: exact float, int within int64, bool, str.
    """
    strings, h = agent.strings, agent.h_attr
    for key, value in values.items():
        kid = strings.get(key)
        if kid is None:
            return False
        cls = value.__class__
        if cls is float:
            flat += (h[2], owner, role, t, kid, 0, _NO_STEP, 0, value)
        elif cls is int and -(2**63) <= value < 2**63:
            flat += (h[1], owner, role, t, kid, 0, _NO_STEP, value, 0.0)
        elif cls is str:
            sid = strings.get(value)
            if sid is None:
                return False
            flat += (h[4], owner, role, t, kid, sid, _NO_STEP, 0, 0.0)
        elif cls is bool:
            flat += (h[3], owner, role, t, kid, 0, _NO_STEP, int(value), 0.0)
        else:
            return False
    return True


def _write_values(agent: Agent, owner: int, values: dict[str, Any], role: int) -> None:
    if _c_values is not None and _c_values(agent, owner, role, values):
        return
    t = _time_ns()
    flat: list[Any] = []
    if _flat_values(agent, owner, role, t, values, flat) and \
            agent.write_flat(flat, len(flat) // 9):
        return
    agent.write(_value_rows(agent, owner, role, t, values))




def _relate(agent: Agent, subject: int, relation: str, obj: int) -> None:
    if subject and obj:
        agent.emit(R.RELATION, 0, 0, subject, obj, _time_ns(), relation, None, _NO_STEP, 0, 0.0)


def _entity_id(e: Any) -> int:
    if isinstance(e, Entity):
        return e.id
    if isinstance(e, (str, os.PathLike)):
        return data(e).id
    raise ValueError("provhpc: expected an entity from provhpc.data()/hyperparameters(), "
                     f"got {e!r}")


def _input_ids(used: Any) -> list[int]:
    """The entity ids of an activity's ``used=``: one entity or path, or a list or tuple."""
    return [_entity_id(e) for e in (used if used.__class__ in (list, tuple) else (used,))]


# ---------------------------------------------------------------------- entities
class Entity:
    """A PROV entity: data item, hyperparameter set, model, checkpoint, code."""

    __slots__ = ("id", "key", "kind")

    def __init__(self, key: str, kind: str, eid: int):
        self.key, self.kind, self.id = key, kind, eid

    def attribute(self, name: str, value: Any) -> Entity:
        agent = _agent
        if agent is not None and self.id:
            _write_values(agent, self.id, {name: value}, ROLE_ATTRIBUTE)
        else:
            _check_keys({name: value})
        return self

    def attributes(self, **values: Any) -> Entity:
        agent = _agent
        if agent is not None and self.id:
            _write_values(agent, self.id, values, ROLE_ATTRIBUTE)
        else:
            _check_keys(values)
        return self

    def derived_from(self, *sources: Any) -> Entity:
        agent = _agent
        if agent is not None:
            for src in sources:
                _relate(agent, self.id, R.WAS_DERIVED_FROM, _entity_id(src))
        else:
            _check_entities(sources)
        return self

    def member(self, *members: Any) -> Entity:
        """PROV hadMember: this entity (a collection) has ``members``."""
        agent = _agent
        if agent is not None:
            for m in members:
                _relate(agent, self.id, R.HAD_MEMBER, _entity_id(m))
        else:
            _check_entities(members)
        return self

    def __repr__(self) -> str:
        return f"<provhpc.Entity {self.kind} {self.key!r} id={self.id}>"


def file_hash(path: str | os.PathLike[str], limit: int | None = None) -> str:
    """BLAKE2b-128 of a file's content, read in 1 MiB blocks (``limit`` bytes at most)."""
    h = hashlib.blake2b(digest_size=16)
    left = limit if limit is not None else -1
    with open(path, "rb") as fh:
        while left:
            block = fh.read(1 << 20 if left < 0 else min(1 << 20, left))
            if not block:
                break
            h.update(block)
            left -= len(block) if left > 0 else 0
    return "blake2b:" + h.hexdigest()


def data(path_or_id: Any, *, kind: str = "data", derived_from: Any = (), hash: bool = False,
         **attributes: Any) -> Entity:
    """A data entity (file, shard, model, checkpoint, domain object).

    ``path_or_id`` is its identity across ranks and runs.  For an existing file its
    size and modification time are recorded (one ``stat``): the same path with the same
    size and mtime is one entity across ranks and runs; with ``hash=True`` its content
    hash is recorded too (attribute ``hash``), and entities link by content.
    """
    key = os.fspath(path_or_id) if isinstance(path_or_id, os.PathLike) else path_or_id
    check_name(key, "data identity")
    check_name(kind, "entity kind")
    agent = get_agent()
    if agent is None:
        return Entity(key, kind, 0)
    eid = agent.next_id()
    agent.emit(R.ENTITY, 0, 0, eid, CURRENT.get(), _time_ns(), key, kind, _NO_STEP, 0, 0.0)
    ent = Entity(key, kind, eid)
    extra: dict[str, Any] = {}
    if kind != "domain" and ("/" in key or "." in key):
        try:
            st = os.stat(key)  # one stat: the fingerprint that links the file across runs
            extra["size"] = st.st_size
            extra["mtime_ns"] = st.st_mtime_ns
            if hash and os.path.isfile(key):
                extra["hash"] = file_hash(key)
        except OSError:
            pass
    if extra or attributes:
        _write_values(agent, eid, {**extra, **attributes}, ROLE_ATTRIBUTE)
    if derived_from:
        sources = derived_from if isinstance(derived_from, (list, tuple)) else (derived_from,)
        ent.derived_from(*sources)
    return ent


def hyperparameters(mapping: dict[str, Any] | None = None, name: str = "hyperparameters",
                    **values: Any) -> Entity:
    """A hyperparameter-set entity, used by the current activity."""
    values = {**(mapping or {}), **values}
    agent = get_agent()
    if agent is None:
        check_name(name, "data identity")
        _check_keys(values)
        return Entity(name, "hyperparameters", 0)
    ent = data(name, kind="hyperparameters")
    _write_values(agent, ent.id, values, ROLE_ATTRIBUTE)
    _relate(agent, CURRENT.get(), R.USED, ent.id)
    return ent


# ---------------------------------------------------------------------- point records
def metric(name: str, value: Any, step: Any = None) -> None:
    """One point of a metric series, attached to the current activity.

    A value that is not a number or a step that is not an integer is data, not misuse: the
    point is dropped and counted as ``bad_value`` (docs/format.md, "Values"), never raised.
    """
    a = _agent
    if a is None:
        if _fork_info is None or (a := get_agent()) is None:
            if name.__class__ is not str or not name:  # misuse raises with capture off too
                check_name(name, "metric name")
            return
    if value.__class__ is not float:
        value = _metric_value(value)
        if value is None:
            return _bad_point(a, name, "the value is not a number")
    if step is None:
        step = _NO_STEP
    elif step.__class__ is not int or step == _NO_STEP:
        step = _metric_step(step)
        if step is None:
            return _bad_point(a, name, "the step is not an integer in int64 (-2**63 excluded)")
    act = CURRENT.get()
    t = _time_ns()
    if _get_ident() == a.owner:  # the owner thread: no lock (see Agent.write)
        nid = a.strings.get(name)
        if nid is not None:
            a.busy = True
            try:
                off = a.off
                if off < a.fast_end:
                    a.pack(a.mm, off, a.h_metric, act, 0, t, nid, 0, step, 0, value)
                    a.off = off + 64
                    return
            except struct.error:  # an int step beyond int64 (nothing was committed)
                return _bad_point(a, name, "the step is not an integer in int64")
            finally:
                a.busy = False
        elif name.__class__ is not str or not name:
            check_name(name, "metric name")
    try:
        a.write([(a.h_metric, act, 0, t, name, None, step, 0, value)])
    except struct.error:
        _bad_point(a, name, "the step is not an integer in int64")


def _bad_point(agent: Any, name: Any, why: str) -> None:
    check_name(name, "metric name")  # a bad name is misuse, whatever the value
    agent.bad_value(name, why)


def _metric_value(value: Any) -> float | None:
    """A metric value as a float, or None when it is not a number (docs/format.md, "Values"):
    int and bool (an int beyond the float range is its signed infinity), numpy scalars and
    anything with ``__float__``; an array or tensor of exactly one element is that element;
    str, bytes, None, complex and bigger arrays are not numbers."""
    if isinstance(value, (str, bytes, bytearray, memoryview)) or value is None:
        return None
    try:
        shape = getattr(value, "shape", None)
        if shape is not None and hasattr(value, "item"):  # numpy and torch alike
            n = 1
            for d in shape:
                n *= int(d)
            if n != 1:
                return None
            value = value.item()
            if isinstance(value, (str, bytes)):
                return None
        return float(value)
    except OverflowError:  # an int beyond the float range: its signed infinity
        return float("inf") if value > 0 else float("-inf")
    except Exception:  # a broken __float__ included: the point is dropped, never raised
        return None


def _metric_step(step: Any) -> int | None:
    """A step is an integer (``operator.index``: int, numpy ints; not bool) within int64,
    -2**63 excluded (it means "no step"); None for anything else (a float, a string)."""
    if isinstance(step, bool):
        return None
    try:
        index: int = operator.index(step)
    except Exception:
        return None
    return index if -(2**63) < index < 2**63 else None


def attribute(name: str, value: Any) -> None:
    """A typed attribute of the current activity."""
    agent = get_agent()
    if agent is not None:
        _write_values(agent, CURRENT.get(), {name: value}, ROLE_ATTRIBUTE)
    else:
        _check_keys({name: value})


def used(*entities: Any) -> None:
    """The current activity used ``entities``."""
    agent = get_agent()
    if agent is not None:
        cur = CURRENT.get()
        for e in entities:
            _relate(agent, cur, R.USED, _entity_id(e))
    else:
        _check_entities(entities)


def generated(*entities: Any, **values: Any) -> None:
    """The current activity generated ``entities`` and computed ``values``."""
    agent = get_agent()
    if agent is not None:
        cur = CURRENT.get()
        for e in entities:
            _relate(agent, _entity_id(e), R.WAS_GENERATED_BY, cur)
        if values:
            _write_values(agent, cur, values, ROLE_GENERATED)
    else:
        _check_entities(entities)
        _check_keys(values)


# ---------------------------------------------------------------------- activities
class _ActivityBase:
    """The fields and with-block of an activity; ``provhpc._fast.ActivityBase`` does the
    same in C (the common case without a Python frame) when the extension is built."""

    __slots__ = ("kind", "name", "index", "params", "inputs", "id", "parent", "_token")

    def __init__(self, kind: str, name: str, index: int = _NO_STEP, used: Any = None,
                 params: dict[str, Any] | None = None):
        self.kind, self.name, self.index = kind, name, index
        self.inputs, self.params = used, params
        self.id = 0
        self.parent = 0
        # the context token of a started activity; False when started with capture off
        self._token: contextvars.Token[int] | Literal[False] | None = None

    # what Activity provides (declared here so that the with-block types)
    def start(self) -> Activity:
        raise NotImplementedError

    def end(self, status: str = "ok", error: BaseException | None = None) -> None:
        raise NotImplementedError

    def _generated(self, *entities: Any, **values: Any) -> Activity:
        raise NotImplementedError

    def __enter__(self) -> Activity:
        return self.start()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> Literal[False]:
        if exc_type is None:
            self.end()
        else:
            self.end("error", exc)
        return False

    def generated(self, *entities: Any, **values: Any) -> Activity:
        return self._generated(*entities, **values)


if _fast is not None:
    _fast.bind(globals(), CURRENT)
    # the C twin of the class above
    _ActivityBase = _fast.ActivityBase  # type: ignore[misc]  # noqa: F811


class Activity(_ActivityBase):
    """A PROV activity: ``with``, ``@decorator`` or explicit ``start()``/``end()``."""

    __slots__ = ()

    def start(self) -> Activity:
        if self._token is not None or self.id:
            raise ValueError(f"provhpc: {self.kind} {self.name!r} already started")
        agent = _agent
        if agent is None:
            agent = get_agent()
            if agent is None:  # capture off: misuse raises all the same, nothing is written
                if self.params:
                    _check_keys(self.params)
                if self.inputs:
                    _check_entities(self.inputs if self.inputs.__class__ in (list, tuple)
                                    else (self.inputs,))
                self._token = False
                return self
        # the inputs first: a misused ``used=`` raises before anything of the activity is written
        inputs = _input_ids(self.inputs) if self.inputs else ()
        if _c_start is not None and _c_start(agent, self, CURRENT, ROLE_PARAMETER):
            for eid in inputs:
                _relate(agent, self.id, R.USED, eid)
            self._token = CURRENT.set(self.id)
            return self
        aid = self.id = agent.next_id()
        parent = self.parent = CURRENT.get()
        t = _time_ns()
        params = self.params
        strings = agent.strings
        nid, kid = strings.get(self.name), strings.get(self.kind)
        flat = [agent.h_start, aid, parent, t, nid, kid, self.index, 0, 0.0]
        if nid is None or kid is None or params and not _flat_values(
                agent, aid, ROLE_PARAMETER, t, params, flat) or \
                not agent.write_flat(flat, len(flat) // 9):
            rows = _value_rows(agent, aid, ROLE_PARAMETER, t, params) if params else []
            agent.write([(agent.h_start, aid, parent, t, self.name, self.kind, self.index, 0,
                          0.0), *rows])
        agent.open_activities[aid] = None
        for eid in inputs:
            _relate(agent, aid, R.USED, eid)
        self._token = CURRENT.set(aid)
        return self

    def end(self, status: str = "ok", error: BaseException | None = None) -> None:
        token = self._token
        if token is None:
            raise ValueError(f"provhpc: {self.kind} {self.name!r} ended without a start")
        self._token = None
        if token is False:
            return
        try:
            CURRENT.reset(token)
        except ValueError:  # ended in another context (thread): restore the parent there
            CURRENT.set(self.parent)
        agent = _agent
        if agent is None:
            return
        agent.open_activities.pop(self.id, None)
        if error is not None:
            values = {"exception": str(error)[:agent.max_string]}
            where = _last_frame(error)
            if where:
                values["where"] = where[:agent.max_string]
            _write_values(agent, self.id, values, ROLE_ATTRIBUTE)
            etype = type(error).__name__
        else:
            etype = None
        code = R.STATUS_OK if status == "ok" else R.STATUS_ERROR
        t = _time_ns()
        if etype is not None or not agent.write_flat(
                [agent.h_end, self.id, 0, t, 0, 0, _NO_STEP, code, 0.0], 1):
            agent.write([(agent.h_end, self.id, 0, t, None, etype, _NO_STEP, code, 0.0)])

    # --- inside the activity
    def _generated(self, *entities: Any, **values: Any) -> Activity:
        """``generated()`` of the base: entities as wasGeneratedBy, values as attributes."""
        agent = _agent
        if agent is not None and self.id:
            for e in entities:
                _relate(agent, _entity_id(e), R.WAS_GENERATED_BY, self.id)
            if values:
                _write_values(agent, self.id, values, ROLE_GENERATED)
        else:
            _check_entities(entities)
            _check_keys(values)
        return self

    def used(self, *entities: Any) -> Activity:
        agent = _agent
        if agent is not None and self.id:
            for e in entities:
                _relate(agent, self.id, R.USED, _entity_id(e))
        else:
            _check_entities(entities)
        return self

    def informed_by(self, other: Activity) -> Activity:
        agent = _agent
        if agent is not None:
            _relate(agent, self.id, R.WAS_INFORMED_BY, other.id)
        return self

    def attribute(self, name: str, value: Any) -> Activity:
        agent = _agent
        if agent is not None and self.id:
            _write_values(agent, self.id, {name: value}, ROLE_ATTRIBUTE)
        else:
            _check_keys({name: value})
        return self

    def attributes(self, **values: Any) -> Activity:
        agent = _agent
        if agent is not None and self.id:
            _write_values(agent, self.id, values, ROLE_ATTRIBUTE)
        else:
            _check_keys(values)
        return self

    def metric(self, name: str, value: Any, step: Any = None) -> Activity:
        """A metric point of this activity (the rules of ``provhpc.metric``)."""
        check_name(name, "metric name")  # misuse raises with capture off too
        agent = _agent
        if agent is not None and self.id:
            value = value if value.__class__ is float else _metric_value(value)
            istep = _NO_STEP if step is None else _metric_step(step)
            if value is None:
                agent.bad_value(name, "the value is not a number")
            elif istep is None:
                agent.bad_value(name, "the step is not an integer in int64 (-2**63 excluded)")
            else:
                agent.emit(_METRIC, _V_FLOAT, 0, self.id, 0, _time_ns(), name, None, istep, 0,
                           value)
        return self

    # --- as a decorator: a fresh activity per call
    def __call__(self, fn: Any) -> Any:
        if not callable(fn):
            raise ValueError(f"provhpc: {self.kind} decorator needs a callable, got {fn!r}")
        return _decorate(fn, self.kind, self.name, self.index, self.inputs)


def _decorate(fn: Any, kind: str, name: str, index: int, inputs: Any,
              record_args: bool = True) -> Any:
    code = getattr(fn, "__code__", None)
    argnames = code.co_varnames[:code.co_argcount] if code is not None else ()
    if _fast is not None:  # the same wrapper in C (provhpc/_fast.c: Decorated)
        return functools.update_wrapper(_fast.decorate(
            fn, Activity, kind, name, index, inputs, tuple(argnames), record_args,
            kind == "epoch" and index == _NO_STEP), fn)
    counter = [0]

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if _agent is None and _fork_info is None:
            return fn(*args, **kwargs)
        params = None
        if record_args:
            params = {k: v for k, v in zip(argnames, args) if k not in ("self", "cls")}
            params.update(kwargs)
        i = index
        if kind == "epoch" and index == _NO_STEP:
            i = counter[0]
            counter[0] += 1
        act = Activity(kind, name, i, inputs, params)
        with act:
            result = fn(*args, **kwargs)
            _record_return(act, result)
        return result

    return wrapper


def _record_return(act: Activity, result: Any) -> None:
    if result is None or not act.id:
        return
    if isinstance(result, Entity):
        act.generated(result)
    elif isinstance(result, dict):
        if all(isinstance(k, str) for k in result):
            act.generated(**result)
    elif isinstance(result, (int, float, str, bool)) or hasattr(result, "item") and \
            getattr(result, "ndim", 1) == 0:
        act.generated(**{"return": result})


def _activity_factory(kind: str) -> Any:
    def make(name: Any = None, used: Any = None, **params: Any) -> Any:
        if name.__class__ is str and name:  # the common case first: task("name", ...)
            return Activity(kind, name, _NO_STEP, used, params or None)
        if callable(name) and used is None and not params:  # bare @provhpc.task
            fn = name
            return _decorate(fn, kind, fn.__qualname__, _NO_STEP, None)
        if name is None:
            name = kind
        check_name(name, f"{kind} name")
        return Activity(kind, name, _NO_STEP, used, params or None)
    return make


task = _activity_factory("task")
task.__doc__ = """An activity: ``with task(name, used=[...], **params) as t`` or ``@task``."""
if _fast is not None:  # task("name", ...) built in C; everything else through make()
    task = _fast.factory(Activity, "task", task, task.__doc__)


def stage(kind: Any = "stage", used: Any = None, **params: Any) -> Any:
    """A learning stage: curation, preparation, train, validate, evaluate or any name."""
    if callable(kind):
        return _decorate(kind, "stage", kind.__name__, _NO_STEP, None)
    check_name(kind, "stage")
    return Activity("stage", kind, _NO_STEP, used, params or None)


def epoch(i: Any = None, used: Any = None, **params: Any) -> Any:
    """Epoch ``i`` (an int).  As a bare decorator the index counts the calls from 0."""
    if callable(i):
        return _decorate(i, "epoch", "epoch", _NO_STEP, None, record_args=False)
    if i is None:
        return Activity("epoch", "epoch", _NO_STEP, used, params or None)
    if isinstance(i, bool) or not hasattr(i, "__index__"):
        raise ValueError(f"provhpc: epoch index must be an int, got {i!r}")
    if not -(2**63) < i.__index__() < 2**63:
        raise ValueError(f"provhpc: epoch index {i} is outside int64")
    return Activity("epoch", "epoch", i.__index__(), used, params or None)


# ---------------------------------------------------------------------- fork safety
def _after_fork_in_child() -> None:
    """A forked child (DataLoader worker) gets its own agent on first use."""
    global _agent, _fork_info, _child_role
    if _agent is not None:
        parent = _agent
        _fork_info = (parent.cfg, parent.ident, parent.run_id, parent.endpoint, parent.job)
        _agent = None
        _child_role = "worker"


_child_role = "worker"  # a forked child; "child" for a process that joined through its env


def attach_child(info: tuple[Any, ...], parent: int) -> None:
    """A Python process started below a rank (a wrapper script's interpreter, a spawn
    child) starts its own agent, role ``child``, on its first record; its activities are
    under ``parent`` (the rank's run activity)."""
    global _fork_info, _child_role
    _fork_info, _child_role = info, "child"
    CURRENT.set(parent)


def child_pending() -> bool:
    """A child agent will start on the first record (forked or attached)."""
    return _fork_info is not None


def _start_child_agent() -> Agent:
    global _agent, _fork_info
    info, _fork_info = _fork_info, None
    assert info is not None  # only called while a forked child has no agent yet
    _agent = start_worker_agent(*info, role=_child_role)
    return _agent


os.register_at_fork(after_in_child=_after_fork_in_child)
