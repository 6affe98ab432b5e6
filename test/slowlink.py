"""A slow network in a box: a TCP proxy that delays every byte by a fixed latency, sends
at a limited rate, and cuts the stream into small pieces (so every frame and every HTTP
request arrives in fragments). Clients connect to the proxy; it connects to the server."""
import socket
import threading
import time
from collections import deque


class SlowLink:
    def __init__(self, target_port, latency=0.04, rate=200_000, piece=13):
        self.target = ("127.0.0.1", target_port)
        self.latency, self.rate, self.piece = latency, rate, piece
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.closed = False
        self.socks = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def _accept(self):
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target)
            except OSError:  # the server has stopped (a test ending): this client is cut too
                client.close()
                continue
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.socks += [client, server]
            self._pipe(client, server)
            self._pipe(server, client)

    def _pipe(self, src, dst):
        pending = deque()
        ready = threading.Condition()

        def read():
            while True:
                try:
                    data = src.recv(65536)
                except OSError:
                    data = b""
                with ready:
                    pending.append((time.monotonic() + self.latency, data))
                    ready.notify()
                if not data:
                    return

        def write():
            while True:
                with ready:
                    while not pending:
                        ready.wait()
                    due, data = pending.popleft()
                time.sleep(max(0.0, due - time.monotonic()))
                if not data:
                    try:
                        dst.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                    return
                for i in range(0, len(data), self.piece):
                    try:
                        dst.sendall(data[i:i + self.piece])
                    except OSError:
                        return
                    time.sleep(self.piece / self.rate)

        threading.Thread(target=read, daemon=True).start()
        threading.Thread(target=write, daemon=True).start()

    def close(self):
        self.closed = True
        self.listener.close()
        for s in self.socks:
            try:
                s.close()
            except OSError:
                pass
