"""A WebSocket client made by hand, for frames no polite client would send:
unmasked, fragmented wrongly, oversized, half-sent, invalid UTF-8.
"""
import base64
import os
import socket
import struct
import time


def mask_bytes(payload, key):
    """payload XOR the 4-byte key repeated (RFC 6455 masking), as one big-integer XOR: a
    byte-by-byte loop in Python takes half a second a megabyte, and holds the GIL
    that a test's other threads (readers timing themselves) need meanwhile."""
    n = len(payload)
    if n == 0:
        return b""
    keys = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(keys, "little")).to_bytes(n, "little")


class Closed(Exception):
    """The server closed the connection."""


class RawWS:
    def __init__(self, host, port, path, timeout=5.0, headers="", early=b"", source=None):
        """early: bytes sent in the same write as the request, before any answer;
        source: the local address to connect from (any 127.x.y.z on loopback)."""
        self.sock = socket.create_connection((host, port), timeout=timeout,
                                             source_address=(source, 0) if source else None)
        key = base64.b64encode(os.urandom(16)).decode()
        request = (f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                   f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                   f"Sec-WebSocket-Version: 13\r\n{headers}\r\n")
        self.sock.sendall(request.encode() + early)
        self.buf = b""
        head = self._read_until(b"\r\n\r\n")
        self.status = int(head.split(b" ", 2)[1])
        self.head = head.decode("latin-1")
        self.close_code = None

    @classmethod
    def engineio(cls, server, query="EIO=4&transport=websocket", **kw):
        return cls(server.host, server.port, f"/socket.io/?{query}", **kw)

    def _read_until(self, marker):
        while marker not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise Closed("EOF during handshake")
            self.buf += chunk
        head, _, self.buf = self.buf.partition(marker)
        return head

    def _read_exact(self, n):
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise Closed("EOF")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    @staticmethod
    def frame(opcode, payload=b"", fin=True, mask=True, rsv=0, length=None):
        if isinstance(payload, str):
            payload = payload.encode()
        n = len(payload) if length is None else length
        head = bytes([(0x80 if fin else 0) | (rsv << 4) | opcode])
        m = 0x80 if mask else 0
        if n < 126:
            head += bytes([m | n])
        elif n < 65536:
            head += bytes([m | 126]) + struct.pack(">H", n)
        else:
            head += bytes([m | 127]) + struct.pack(">Q", n)
        if mask:
            key = os.urandom(4)
            payload = mask_bytes(payload, key)
            head += key
        return head + payload

    def send_raw(self, data):
        self.sock.sendall(data)

    def send_frame(self, opcode, payload=b"", **kw):
        self.sock.sendall(self.frame(opcode, payload, **kw))

    def send_text(self, text):
        self.send_frame(0x1, text)

    def send_binary(self, data):
        self.send_frame(0x2, data)

    def recv_frame(self, timeout=5.0):
        """(fin, opcode, payload). Raises Closed on EOF; socket.timeout if nothing came."""
        self.sock.settimeout(timeout)
        b0, b1 = self._read_exact(2)
        n = b1 & 0x7F
        if n == 126:
            n = struct.unpack(">H", self._read_exact(2))[0]
        elif n == 127:
            n = struct.unpack(">Q", self._read_exact(8))[0]
        assert not (b1 & 0x80), "server frames must not be masked"
        payload = self._read_exact(n)
        if b0 & 0x0F == 0x8:
            self.close_code = struct.unpack(">H", payload[:2])[0] if len(payload) >= 2 else 1005
        return bool(b0 & 0x80), b0 & 0x0F, payload

    def recv_message(self, timeout=5.0):
        """The next data message as str (text) or bytes (binary); pings are answered."""
        deadline = time.monotonic() + timeout
        while True:
            fin, op, payload = self.recv_frame(max(0.01, deadline - time.monotonic()))
            if op == 0x8:
                raise Closed(f"close frame {self.close_code}")
            if op == 0x9:
                self.send_frame(0xA, payload)
                continue
            if op == 0x1:
                return payload.decode()
            if op == 0x2:
                return payload

    def expect_close(self, timeout=5.0):
        """Reads until the server closes; returns the close code it sent (None if it only
        dropped the connection)."""
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                fin, op, payload = self.recv_frame(max(0.01, deadline - time.monotonic()))
                if op == 0x8:
                    return self.close_code
        except (Closed, ConnectionResetError):
            return self.close_code
        raise AssertionError("the server did not close the connection")

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass
