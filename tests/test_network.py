"""The optional network transport (contract 7): no port unless PROVHPC_LISTEN names one
interface, and then only CURVE with the run's shared key; remote ranks go inline.

Only the loopback address 127.0.0.1 is ever used here.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import stat
import subprocess
import time

import pytest
import zmq

from provhpc import cli
from provhpc.capture.agent import Agent
from provhpc.format import netkey
from provhpc.format import protocol as P
from provhpc.format.records import METRIC, V_FLOAT
from provhpc.format.segment import segment_name, shm_dir
from provhpc.launch.config import load
from provhpc.launch.identity import Identity
from provhpc.node.aggregator import Aggregator
from provhpc.post.reader import Run

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(not zmq.has("curve"), reason="libzmq without CURVE")]

LOOPBACK = "127.0.0.1"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def _key(tmp_path, name="key") -> str:
    path = str(tmp_path / name)
    netkey.keygen(path)
    return path


def _tcp_listeners() -> dict:
    """inode -> (address hex, port) of every TCP socket in LISTEN state."""
    out = {}
    for f in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(f) as fh:
                lines = fh.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if cols[3] == "0A":
                addr, port = cols[1].split(":")
                out[cols[9]] = (addr, int(port, 16))
    return out


def _socket_inodes(pid: int) -> set:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def _listeners_of(pid: int) -> list:
    listening = _tcp_listeners()
    return [listening[i] for i in _socket_inodes(pid) if i in listening]


def _aggregator(tmp_path, run_id, **settings):
    cfg = load(out=str(tmp_path), run_id=run_id, runtime_dir=str(tmp_path), heartbeat=0.05,
               telemetry_interval=0, **settings)
    rt = tmp_path / "rt"
    rt.mkdir(mode=0o700, exist_ok=True)
    agg = Aggregator(cfg, run_id, "aggnode", str(tmp_path),
                     f"ipc://{rt}/{secrets.token_hex(4)}.sock", str(rt / "ready"),
                     expect=0, linger=60.0)
    return agg


def _remote_agent(tmp_path, run_id, endpoint, key_file, rank=7, **settings):
    cfg = load(out=str(tmp_path), run_id=run_id, runtime_dir=str(tmp_path), connect=endpoint,
               key_file=key_file, flush_interval=0.2, **settings)
    ident = Identity(rank=rank, node="remotehost", host="remotehost")
    seg = os.path.join(shm_dir(), segment_name(run_id, "remotehost", rank, os.getpid()))
    return Agent(cfg, ident, run_id, cfg.connect, seg)


# ---------------------------------------------------------------------------- (a) default
def test_default_aggregator_process_listens_on_no_port(tmp_path, venv_bin, clean_env):
    env = {**clean_env, "PROVHPC_RUNTIME_DIR": str(tmp_path / "rt"),
           "PROVHPC_TELEMETRY_INTERVAL": "0"}
    proc = subprocess.Popen([os.path.join(venv_bin, "provhpc"), "aggregate", "--run-id",
                             "net-default", "--out", str(tmp_path / "o"), "--node", "n0",
                             "--linger", "60"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        ready = tmp_path / "rt" / f"provhpc-{os.getuid()}" / "net-default" / "n0" / "ready"
        for _ in range(500):
            if ready.exists():
                break
            time.sleep(0.02)
        assert ready.exists()
        assert _socket_inodes(proc.pid), "the aggregator has no socket at all?"
        assert _listeners_of(proc.pid) == []
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def test_listening_aggregator_process_binds_the_given_interface_only(tmp_path, venv_bin,
                                                                     clean_env):
    port = _free_port()
    env = {**clean_env, "PROVHPC_RUNTIME_DIR": str(tmp_path / "rt"),
           "PROVHPC_TELEMETRY_INTERVAL": "0", "PROVHPC_LISTEN": f"tcp://{LOOPBACK}:{port}",
           "PROVHPC_KEY_FILE": _key(tmp_path)}
    proc = subprocess.Popen([os.path.join(venv_bin, "provhpc"), "aggregate", "--run-id",
                             "net-listen", "--out", str(tmp_path / "o"), "--node", "n0",
                             "--linger", "60"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        ready = tmp_path / "rt" / f"provhpc-{os.getuid()}" / "net-listen" / "n0" / "ready"
        for _ in range(500):
            if ready.exists():
                break
            time.sleep(0.02)
        assert ready.exists()
        assert _listeners_of(proc.pid) == [("0100007F", port)]  # 127.0.0.1, nothing else
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


# ---------------------------------------------------------------------------- (b) inline
def test_remote_rank_over_curve_goes_inline_and_every_record_arrives(tmp_path):
    run_id = "net-" + secrets.token_hex(3)
    key = _key(tmp_path)
    port = _free_port()
    endpoint = f"tcp://{LOOPBACK}:{port}"
    agg = _aggregator(tmp_path, run_id, listen=endpoint, key_file=key)
    thread = agg.start_thread()
    assert agg.ready.wait(10)
    assert _listeners_of(os.getpid()) == [("0100007F", port)]
    agent = _remote_agent(tmp_path, run_id, endpoint, key)
    n = 5000
    try:
        assert agent.wait_ready(10) and agent.mode == "inline"
        for i in range(n):
            agent.emit(METRIC, V_FLOAT, 0, 0, 0, time.time_ns(), "loss", None, i, 0, float(i))
        # idle for a while: heartbeats keep the remote stream alive (no pid to watch)
        (stream,) = agg.streams.values()
        assert stream.mode == "inline" and stream.seg is None
        seen = stream.last_seen
        time.sleep(2.5)
        assert stream.last_seen - seen >= 1.0 and not stream.closed
    finally:
        assert agent.shutdown()
    agg.stop()
    thread.join(20)
    assert agg.exit_status == 0
    with Run(str(tmp_path / run_id)) as run:
        (part,) = run.partitions
        recs = part.records()
        metrics = recs[recs["kind"] == METRIC]
        assert sorted(metrics["step"].tolist()) == list(range(n))
        assert set(metrics["rank"].tolist()) == {7}
        assert [(r["rank"], r["status"]) for r in run.ranks()] == [(7, "ok")]
    assert agg.writer.counters["malformed_frames"] == 0
    assert agg.refused_connections == 0


# ---------------------------------------------------------------------------- (c) refused
def _try_client(endpoint, hello, curve=None, timeout=1.5):
    """Send a hello from a bare DEALER; the reply, or None when nothing came back."""
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.IDENTITY, b"intruder")
    if curve is not None:
        public, secret, server = curve
        s.curve_publickey, s.curve_secretkey, s.curve_serverkey = public, secret, server
    try:
        s.connect(endpoint)
        s.send_multipart([P.HELLO, P.dumps(hello)])
        s.send_multipart([P.BATCH, b"garbage"])
        if s.poll(int(timeout * 1000)):
            return s.recv_multipart()
        return None
    finally:
        s.close(0)
        ctx.term()


def test_clients_without_the_key_get_nothing_through(tmp_path):
    run_id = "net-" + secrets.token_hex(3)
    key = _key(tmp_path)
    endpoint = f"tcp://{LOOPBACK}:{_free_port()}"
    agg = _aggregator(tmp_path, run_id, listen=endpoint, key_file=key)
    thread = agg.start_thread()
    assert agg.ready.wait(10)
    server_public = zmq.curve_public(netkey.load_secret(key))
    hello = {"rank": 3, "pid": 4242, "run_id": run_id, "segment": ""}
    try:
        before = dict(agg.writer.counters)
        other_public, other_secret = zmq.curve_keypair()
        assert _try_client(endpoint, hello, (other_public, other_secret, server_public)) is None
        assert _try_client(endpoint, hello) is None  # no CURVE at all
        # another key that even claims the server's public key as its own
        assert _try_client(endpoint, hello, (server_public, other_secret, server_public)) is None
        time.sleep(0.3)
        assert agg.streams == {}
        assert agg.writer.counters["malformed_frames"] == before["malformed_frames"]
        assert agg.writer.counters["refused_hellos"] == before["refused_hellos"]
        assert agg.refused_connections >= 1  # the ZAP handler saw and refused the wrong key
        # the listener was up all along: the run's key gets through
        agent = _remote_agent(tmp_path, run_id, endpoint, key, rank=1)
        assert agent.wait_ready(10) and agent.mode == "inline"
        agent.emit(METRIC, V_FLOAT, 0, 0, 0, time.time_ns(), "m", None, 0, 0, 1.0)
        assert agent.shutdown()
    finally:
        agg.stop()
        thread.join(20)
    with Run(str(tmp_path / run_id)) as run:
        assert [r["rank"] for r in run.ranks()] == [1]


# ---------------------------------------------------------------------------- (d) errors
def test_listen_without_key_file_refuses_to_start(tmp_path):
    with pytest.raises(ValueError, match="PROVHPC_KEY_FILE"):
        _aggregator(tmp_path, "net-nokey", listen=f"tcp://{LOOPBACK}:{_free_port()}")


def test_aggregate_cli_without_key_file_exits_with_a_clear_message(tmp_path, venv_bin,
                                                                 clean_env):
    env = {**clean_env, "PROVHPC_RUNTIME_DIR": str(tmp_path / "rt"),
           "PROVHPC_LISTEN": f"tcp://{LOOPBACK}:{_free_port()}"}
    r = subprocess.run([os.path.join(venv_bin, "provhpc"), "aggregate", "--run-id", "net-cli",
                        "--out", str(tmp_path / "o"), "--node", "n0"], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "PROVHPC_KEY_FILE" in r.stderr
    assert not (tmp_path / "o" / "net-cli" / "n0.h5").exists()


@pytest.mark.parametrize("addr", ["tcp://*:5555", "tcp://0.0.0.0:5555", "tcp://[::]:5555",
                                  "tcp://:5555"])
def test_wildcard_listen_address_is_refused(addr, tmp_path):
    with pytest.raises(ValueError, match="PROVHPC_LISTEN.*wildcard"):
        load(listen=addr)
    with pytest.warns(RuntimeWarning, match="PROVHPC_LISTEN"):  # environment: warn, no port
        assert load(environ={"PROVHPC_LISTEN": addr}).listen == ""


@pytest.mark.parametrize("addr", ["udp://127.0.0.1:1", "tcp://127.0.0.1", "tcp://127.0.0.1:0",
                                  "tcp://127.0.0.1:*", "ipc:///tmp/x"])
def test_malformed_endpoints_are_refused(addr):
    for name in ("listen", "connect"):
        with pytest.raises(ValueError):
            load(**{name: addr})


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660])
def test_key_file_readable_by_others_is_refused(mode, tmp_path):
    key = _key(tmp_path)
    os.chmod(key, mode)
    with pytest.raises(PermissionError, match="chmod 600"):
        _aggregator(tmp_path, "net-perm", listen=f"tcp://{LOOPBACK}:{_free_port()}",
                    key_file=key)
    with pytest.raises(PermissionError, match="chmod 600"):
        _remote_agent(tmp_path, "net-perm", f"tcp://{LOOPBACK}:{_free_port()}", key)


def test_bad_key_files_are_refused(tmp_path):
    missing = str(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="keygen"):
        netkey.load_secret(missing)
    short = tmp_path / "short"
    short.write_text("abc\n")
    os.chmod(short, 0o600)
    with pytest.raises(ValueError, match="CURVE secret"):
        netkey.load_secret(str(short))
    link = tmp_path / "link"
    link.symlink_to(_key(tmp_path))
    with pytest.raises(PermissionError):
        netkey.load_secret(str(link))


def test_connect_without_key_file_is_refused(tmp_path):
    with pytest.raises(ValueError, match="PROVHPC_KEY_FILE"):
        _remote_agent(tmp_path, "net-nokey", f"tcp://{LOOPBACK}:{_free_port()}", "")


# ---------------------------------------------------------------------------- (e) keygen
def test_keygen_writes_an_owner_only_secret_and_prints_nothing_secret(tmp_path, capsys):
    path = str(tmp_path / "run.key")
    assert cli.main(["keygen", path]) == 0
    printed = capsys.readouterr()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    secret = netkey.load_secret(path)
    assert len(secret) == 40
    assert secret.decode() not in printed.out + printed.err
    assert zmq.curve_public(secret).decode() not in printed.out + printed.err
    assert cli.main(["keygen", path]) == 2  # never overwritten
    assert netkey.load_secret(path) == secret


def test_keygen_is_0600_under_a_permissive_umask(tmp_path):
    old = os.umask(0)
    try:
        path = str(tmp_path / "k")
        assert cli.main(["keygen", path]) == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
