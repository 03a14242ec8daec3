"""The optional network transport: one shared CURVE secret per run (contract 7).

Nothing listens on a network port unless ``PROVHPC_LISTEN`` names one
interface's ``tcp://ADDR:PORT``, and then only with ``PROVHPC_KEY_FILE``: a
CURVE secret key (40 characters of Z85) in an owner-only file.  The aggregator
uses it as its server key; every rank that connects (``PROVHPC_CONNECT``) uses
the same key pair as its client key, and the aggregator's ZAP handler admits
that one client public key only.  A peer without the secret cannot finish the
handshake, so none of its frames reaches the aggregator.
"""

from __future__ import annotations

import os
import stat
from typing import Any

import zmq
from zmq.utils import z85

__all__ = [
    "KEY_CHARS", "ZAP_DOMAIN", "ZAP_ENDPOINT", "keygen", "keypair", "load_secret", "setup_client",
    "setup_server", "zap_reply"
]

KEY_CHARS = 40
ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_DOMAIN = b"provhpc"


def load_secret(path: str) -> bytes:
    """The Z85 secret in ``path``; the file must be a regular file, yours, mode 0600."""
    if not path:
        raise ValueError("provhpc: no PROVHPC_KEY_FILE given (create one with "
                         "`provhpc keygen FILE`)")
    if not zmq.has("curve"):
        raise RuntimeError("provhpc: this libzmq has no CURVE support; the network "
                           "transport is unavailable")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        raise FileNotFoundError(f"provhpc: PROVHPC_KEY_FILE {path} does not exist (create "
                                "it with `provhpc keygen FILE`)") from None
    except OSError as exc:
        raise PermissionError(f"provhpc: cannot open PROVHPC_KEY_FILE {path}: {exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise PermissionError(f"provhpc: PROVHPC_KEY_FILE {path} is not a regular file")
        if st.st_uid != os.getuid():
            raise PermissionError(f"provhpc: PROVHPC_KEY_FILE {path} is not owned by you")
        if st.st_mode & 0o077:
            raise PermissionError(
                f"provhpc: PROVHPC_KEY_FILE {path} is readable by group or others (mode "
                f"{stat.S_IMODE(st.st_mode):04o}); it must be owner-only: chmod 600 {path}")
        data = os.read(fd, 4096)
    finally:
        os.close(fd)
    key = data.strip()
    if len(key) != KEY_CHARS:
        raise ValueError(f"provhpc: PROVHPC_KEY_FILE {path} does not hold a CURVE secret "
                         f"({KEY_CHARS} Z85 characters); create one with `provhpc keygen FILE`")
    try:
        zmq.curve_public(key)
    except (zmq.ZMQError, ValueError, TypeError):
        raise ValueError(f"provhpc: PROVHPC_KEY_FILE {path} does not hold a valid Z85 "
                         "CURVE secret") from None
    return key


def keypair(path: str) -> tuple[bytes, bytes]:
    """(public, secret) of the shared key in ``path``."""
    secret = load_secret(path)
    return zmq.curve_public(secret), secret


def keygen(path: str) -> None:
    """Write a new secret to ``path`` (mode 0600); an existing file is never overwritten."""
    if not zmq.has("curve"):
        raise RuntimeError("provhpc: this libzmq has no CURVE support")
    _public, secret = zmq.curve_keypair()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0),
                 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, secret + b"\n")
    finally:
        os.close(fd)


def setup_client(sock: Any, path: str) -> None:
    """A DEALER that authenticates with the shared key (set before ``connect``)."""
    public, secret = keypair(path)
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_serverkey = public


def setup_server(sock: Any, public: bytes, secret: bytes) -> None:
    """A ROUTER that is a CURVE server checked by the ZAP handler (set before ``bind``)."""
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_server = True
    sock.zap_domain = ZAP_DOMAIN
    if hasattr(zmq, "ZAP_ENFORCE_DOMAIN"):  # no handler = refuse, never accept everyone
        try:
            sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
        except zmq.ZMQError:
            pass


def zap_reply(frames: list[Any], allowed: bytes) -> list[bytes]:
    """The ZAP (RFC 27) answer to one request: 200 for the shared public key only."""
    version, request_id = frames[0], frames[1] if len(frames) > 1 else b""
    ok = (len(frames) >= 7 and version == b"1.0" and frames[2] == ZAP_DOMAIN
          and frames[5] == b"CURVE" and len(frames[6]) == 32
          and z85.encode(bytes(frames[6])) == allowed)
    if ok:
        return [b"1.0", request_id, b"200", b"OK", b"provhpc", b""]
    return [b"1.0", request_id, b"400", b"not the run's key", b"", b""]
