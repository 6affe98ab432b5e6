"""Attacks on the server's budgets, each performed as an attacker would, on loopback.

Every test here names what it does to the server and what the server must do about it:
refuse with the protocol's error, or drop the attacker, while its memory stays bounded
and everybody else keeps chatting.
"""
import socket
import struct
import time

from rawws import Closed, RawWS
from test_robustness import rss_kib


def test_fragment_length_that_wraps_is_refused_before_buffering(server):
    # A 20-byte first fragment, then a continuation that declares 2^64 - 10 bytes: the
    # sum wraps to 10, under maxPayload, if the server adds without checking.
    ws = RawWS.engineio(server)
    ws.recv_message()
    rss_before = rss_kib(server.proc.pid)
    ws.send_frame(0x1, "4" + "x" * 19, fin=False)
    head = bytes([0x00, 0x80 | 127]) + struct.pack(">Q", 2**64 - 10) + b"\0\0\0\0"
    ws.send_raw(head)
    sent = 0
    chunk = b"\0" * 65536
    deadline = time.monotonic() + 5
    try:
        while sent < 64 << 20 and time.monotonic() < deadline:
            ws.sock.settimeout(1)
            ws.sock.sendall(chunk)
            sent += len(chunk)
    except (BrokenPipeError, ConnectionResetError, socket.timeout):
        pass
    assert ws.expect_close(timeout=3) == 1009
    grown = rss_kib(server.proc.pid) - rss_before
    assert grown < 16 * 1024, f"server RSS grew {grown} KiB while the attacker sent {sent >> 20} MiB"
