#!/usr/bin/env python3
"""CQL readiness probe for deploy/local: no third-party packages needed.

Speaks just enough of the CQL native protocol (v4) to do what a driver does on
connect: STARTUP, then run `SELECT release_version FROM system.local` and read the
answer.  A node that answers that query is past start-up and serving CQL, which is
stronger than "port 19042 accepts TCP".

usage: cql_ping.py HOST PORT [TIMEOUT_SECONDS]
Retries until the timeout (default 0 = one try).  Exit 0 and print the server's
release_version on stderr when ready, exit 1 otherwise.
"""

import socket
import struct
import sys
import time

VERSION = 0x04  # request frame, protocol v4 (Cassandra 5.0 and ScyllaDB both accept it)
OP_ERROR, OP_STARTUP, OP_READY, OP_AUTHENTICATE, OP_QUERY, OP_RESULT = 0x00, 0x01, 0x02, 0x03, 0x07, 0x08
RESULT_ROWS = 0x0002
CONSISTENCY_ONE = 0x0001


def cql_string(s: str) -> bytes:
    b = s.encode()
    return struct.pack(">H", len(b)) + b


def frame(stream: int, opcode: int, body: bytes) -> bytes:
    return struct.pack(">BBhBI", VERSION, 0, stream, opcode, len(body)) + body


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("connection closed by server")
        buf += chunk
    return buf


def recv_frame(sock: socket.socket):
    _version, _flags, _stream, opcode, length = struct.unpack(">BBhBI", recv_exact(sock, 9))
    return opcode, recv_exact(sock, length)


class Reader:
    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def take(self, fmt: str):
        vals = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += struct.calcsize(fmt)
        return vals[0] if len(vals) == 1 else vals

    def string(self) -> str:
        n = self.take(">H")
        s = self.data[self.pos:self.pos + n].decode()
        self.pos += n
        return s

    def bytes_(self):
        n = self.take(">i")
        if n < 0:
            return None
        b = self.data[self.pos:self.pos + n]
        self.pos += n
        return b


def error_text(body: bytes) -> str:
    r = Reader(body)
    code = r.take(">i")
    return f"server error 0x{code:04x}: {r.string()}"


def ping(host: str, port: int) -> str:
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.settimeout(5)
        body = struct.pack(">H", 1) + cql_string("CQL_VERSION") + cql_string("3.0.0")
        sock.sendall(frame(1, OP_STARTUP, body))
        opcode, body = recv_frame(sock)
        if opcode == OP_ERROR:
            raise RuntimeError(error_text(body))
        if opcode == OP_AUTHENTICATE:
            raise RuntimeError("server requires authentication (expected AllowAllAuthenticator)")
        if opcode != OP_READY:
            raise RuntimeError(f"unexpected opcode 0x{opcode:02x} after STARTUP")

        query = b"SELECT release_version FROM system.local"
        body = struct.pack(">I", len(query)) + query + struct.pack(">HB", CONSISTENCY_ONE, 0)
        sock.sendall(frame(2, OP_QUERY, body))
        opcode, body = recv_frame(sock)
        if opcode == OP_ERROR:
            raise RuntimeError(error_text(body))
        if opcode != OP_RESULT:
            raise RuntimeError(f"unexpected opcode 0x{opcode:02x} after QUERY")

        r = Reader(body)
        if r.take(">i") != RESULT_ROWS:
            raise RuntimeError("QUERY did not return rows")
        flags, ncols = r.take(">ii")
        if flags & 0x0002:  # has_more_pages: paging state follows
            r.bytes_()
        if flags & 0x0004:  # no_metadata
            ncols = 0
        else:
            if flags & 0x0001:  # global_tables_spec: keyspace + table once
                r.string(), r.string()
            for _ in range(ncols):
                if not flags & 0x0001:
                    r.string(), r.string()
                r.string()  # column name
                r.take(">H")  # type id (varchar here, no extra payload)
        nrows = r.take(">i")
        if nrows < 1 or ncols < 1:
            raise RuntimeError("system.local returned no rows")
        value = r.bytes_()
        return value.decode() if value is not None else "?"


def main() -> int:
    host, port = sys.argv[1], int(sys.argv[2])
    timeout = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
    deadline = time.monotonic() + timeout
    last = ""
    while True:
        try:
            version = ping(host, port)
            print(f"cql-ping: {host}:{port} serves CQL, release_version {version}", file=sys.stderr)
            return 0
        except (OSError, RuntimeError, struct.error, ValueError) as e:
            last = f"{type(e).__name__}: {e}"
        if time.monotonic() >= deadline:
            break
        time.sleep(1)
    print(f"cql-ping: {host}:{port} not ready: {last}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
