#!/usr/bin/env python3
"""Start-up cost of a chatroom binary: time from exec to the first answered Engine.IO
handshake, and resident memory once idle. Prints one line.

    bench/startup.py [--runs N] [--qemu qemu-aarch64-static] BINARY [chatroom flags...]
"""
import argparse
import os
import socket
import statistics
import subprocess
import time


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def handshake(port):
    with socket.create_connection(("127.0.0.1", port), timeout=1) as c:
        c.sendall(b"GET /socket.io/?EIO=4&transport=polling HTTP/1.1\r\nHost: x\r\n\r\n")
        return c.recv(256).startswith(b"HTTP/1.1 200")


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def one_run(cmd):
    port = free_port()
    start = time.perf_counter()
    proc = subprocess.Popen(cmd + ["--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={})
    try:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"{' '.join(cmd)} exited with {proc.returncode}")
            try:
                if handshake(port):
                    break
            except OSError:
                time.sleep(0.0005)
        up = time.perf_counter() - start
        time.sleep(1.0)
        return up, rss_kib(proc.pid)
    finally:
        proc.terminate()
        proc.wait()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--qemu")
    ap.add_argument("binary")
    ap.add_argument("flags", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    cmd = ([a.qemu] if a.qemu else []) + [os.path.abspath(a.binary)] + a.flags
    runs = [one_run(cmd) for _ in range(a.runs)]
    ups = [u for u, _ in runs]
    print(f"{os.path.basename(a.binary)} {' '.join(a.flags)}: {os.path.getsize(a.binary)} bytes, "
          f"exec to first handshake median {statistics.median(ups) * 1000:.1f} ms "
          f"(min {min(ups) * 1000:.1f}, max {max(ups) * 1000:.1f}) over {a.runs} runs, "
          f"idle RSS {statistics.median(r for _, r in runs) / 1024:.1f} MiB"
          + (f" under {a.qemu}" if a.qemu else ""))


if __name__ == "__main__":
    main()
