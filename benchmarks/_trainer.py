"""Run examples/train_mlp.py under one capture variant and report this rank's timing.

    [mpiexec -n N] [provhpc run --] python benchmarks/_trainer.py \
        --variant off|provhpc|jsonl|flowcept --fanout K --out DIR -- TRAINER-ARGS

The trainer is run unchanged through its ``main()``; only the provhpc module
it calls is swapped for the JSONL and Flowcept variants, so every variant makes
the same instrumentation calls:

  off       the provhpc API with no agent (a no-op): the baseline;
  provhpc   the real API (run under ``provhpc run``);
  jsonl     a per-rank JSONL file: one ``json.dumps`` line per record, buffered;
  flowcept  Flowcept offline: ``FlowceptTask`` per activity and per metric point,
            in-memory buffer dumped as JSONL at the end.

``--fanout K`` makes every ``metric`` call of the trainer record K points (the
original one plus K-1 ``stress_i`` series): the stress rate.  Every epoch is
timed (sum = training time, including the capture inside the epochs) and each
rank prints one ``BENCH {json}`` line; a node leader also reports the CPU time
and peak RSS of its children (the aggregator it spawned) at exit.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import resource
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))

import provhpc  # noqa: E402

_state = {"train_s": 0.0, "metric_calls": 0, "records": 0}


# ---------------------------------------------------------------------- JSONL baseline
class _Obj:
    """Entity or activity of the JSONL / Flowcept stand-ins."""

    def __init__(self, sink, kind, name, params=None, task=None):
        self.sink, self.kind, self.name, self.params, self.task = sink, kind, name, params, task
        self.values = {}

    def __enter__(self):
        self.sink.start(self)
        return self

    def __exit__(self, exc_type, exc, tb):
        self.sink.end(self)
        return False

    def generated(self, *entities, **values):
        self.values.update(values)
        return self

    def used(self, *entities):
        return self

    def attributes(self, **values):
        self.values.update(values)
        return self

    attribute = lambda self, k, v: self.attributes(**{k: v})  # noqa: E731


def _plain(v):
    return v if isinstance(v, (int, float, str, bool)) or v is None else str(v)


class JsonlSink:
    """What a careful user would write by hand: one JSON line per event, per-rank file."""

    def __init__(self, path, rank):
        self.fh = open(path, "w", buffering=1 << 16)
        self.rank = rank
        atexit.register(self.fh.close)

    def write(self, **rec):
        rec["t"], rec["rank"] = time.time_ns(), self.rank
        self.fh.write(json.dumps(rec) + "\n")
        _state["records"] += 1

    def start(self, a):
        self.write(ev="start", kind=a.kind, name=a.name,
                   params={k: _plain(v) for k, v in (a.params or {}).items()})

    def end(self, a):
        self.write(ev="end", kind=a.kind, name=a.name,
                   generated={k: _plain(v) for k, v in a.values.items()})

    def entity(self, key, kind, attrs):
        self.write(ev="entity", kind=kind, name=key,
                   attrs={k: _plain(v) for k, v in attrs.items()})
        return _Obj(self, kind, key)

    def metric(self, name, value, step):
        self.write(ev="metric", name=name, value=float(value), step=step)


class FlowceptSink:
    """Flowcept offline: a FlowceptTask per activity and per metric point."""

    def __init__(self, path, rank):
        os.environ.setdefault("FLOWCEPT_SETTINGS_PATH", os.path.join(os.path.dirname(path),
                                                                     "no-settings.yaml"))
        from flowcept import Flowcept, FlowceptTask

        self.Task, self.path, self.rank = FlowceptTask, path, rank
        self.fc = Flowcept(start_persistence=False, workflow_name=f"train_mlp-rank{rank}")
        self.fc.start()
        atexit.register(self.close)

    def close(self):
        self.fc.dump_buffer(self.path)
        self.fc.stop()

    def start(self, a):
        a.task = self.Task(activity_id=a.name, subtype=a.kind,
                           used={k: _plain(v) for k, v in (a.params or {}).items()})
        _state["records"] += 1

    def end(self, a):
        a.task.end(generated={k: _plain(v) for k, v in a.values.items()} or None)

    def entity(self, key, kind, attrs):
        self.Task(activity_id="data", subtype=kind, used={"key": key},
                  generated={k: _plain(v) for k, v in attrs.items()} or None)
        _state["records"] += 1
        return _Obj(self, kind, key)

    def metric(self, name, value, step):
        self.Task(activity_id=name, subtype="metric", used={"step": step},
                  generated={"value": float(value)})
        _state["records"] += 1


def install_sink(sink) -> None:
    """Point the provhpc names the trainer uses at ``sink``."""
    def activity(kind):
        def make(name=kind, used=None, **params):
            return _Obj(sink, kind, name, params)
        return make

    provhpc.task, provhpc.stage = activity("task"), activity("stage")
    provhpc.epoch = lambda i=None, used=None, **p: _Obj(sink, "epoch", f"epoch{i}", p)
    provhpc.data = lambda key, kind="data", derived_from=(), hash=False, **attrs: \
        sink.entity(str(key), kind, attrs)
    provhpc.hyperparameters = lambda mapping=None, name="hyperparameters", **values: \
        sink.entity(name, "hyperparameters", {**(mapping or {}), **values})
    provhpc.metric = lambda name, value, step=None: sink.metric(name, value, step)
    provhpc.attribute = lambda name, value: None


# ---------------------------------------------------------------------- harness instrumentation
def install_fanout(k: int) -> None:
    """Every metric call records ``k`` points: the stress rate."""
    real = provhpc.metric
    names = [f"stress_{i}" for i in range(1, k)]

    def metric(name, value, step=None):
        real(name, value, step=step)
        for n in names:
            real(n, value, step=step)
        _state["metric_calls"] += k
    provhpc.metric = metric


def install_epoch_timer() -> None:
    real = provhpc.epoch

    class Timed:
        __slots__ = ("inner", "t0")

        def __init__(self, inner):
            self.inner = inner

        def __enter__(self):
            self.t0 = time.perf_counter()
            self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            r = self.inner.__exit__(*exc)
            _state["train_s"] += time.perf_counter() - self.t0
            return r

    provhpc.epoch = lambda *a, **k: Timed(real(*a, **k))


def report(rank: int, variant: str, t_main: float) -> None:
    from provhpc.capture import api

    agent = api.get_agent(start_child=False)
    doc = {"rank": rank, "variant": variant, "train_s": _state["train_s"], "main_s": t_main,
           "metric_points": _state["metric_calls"],
           "records": agent.records if agent is not None else _state["records"]}
    print("BENCH " + json.dumps(doc), flush=True)


def report_children(rank: int) -> None:
    """At exit, after provhpc waited for its aggregator: the children's CPU and peak RSS."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    if ru.ru_utime + ru.ru_stime > 0:
        print("BENCH_AGG " + json.dumps({"rank": rank, "cpu_s": ru.ru_utime + ru.ru_stime,
                                         "peak_rss": ru.ru_maxrss * 1024}), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", choices=("off", "provhpc", "jsonl", "flowcept"), required=True)
    ap.add_argument("--fanout", type=int, default=1)
    ap.add_argument("--out", default=".")
    ap.add_argument("trainer_args", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    targs = args.trainer_args[1:] if args.trainer_args[:1] == ["--"] else args.trainer_args

    from mpi4py import MPI

    rank = MPI.COMM_WORLD.Get_rank()
    if args.variant == "jsonl":
        os.makedirs(args.out, exist_ok=True)
        install_sink(JsonlSink(os.path.join(args.out, f"rank{rank}.jsonl"), rank))
    elif args.variant == "flowcept":
        os.makedirs(args.out, exist_ok=True)
        install_sink(FlowceptSink(os.path.join(args.out, f"rank{rank}.flowcept.jsonl"), rank))
    if args.fanout > 1:
        install_fanout(args.fanout)
    else:
        install_fanout(1)
    install_epoch_timer()
    atexit.register(report_children, rank)  # runs after provhpc's shutdown

    import train_mlp

    t0 = time.perf_counter()
    code = train_mlp.main(targs)
    report(rank, args.variant, time.perf_counter() - t0)
    return code


if __name__ == "__main__":
    sys.exit(main())
