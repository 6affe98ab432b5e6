"""A python-socketio client driven by a Node test: it prints every msg event as a JSON
line (bytes as {"bytes": hex}) and obeys lines on stdin: "say TEXT", "bin HEX",
"json DATA" (sends DATA, a JSON value, as it is), "quit"."""
import json
import sys

import socketio

out_lock = __import__("threading").Lock()


def show(data):
    def enc(v):
        if isinstance(v, bytes):
            return {"bytes": v.hex()}
        if isinstance(v, dict):
            return {k: enc(x) for k, x in v.items()}
        if isinstance(v, list):
            return [enc(x) for x in v]
        return v
    with out_lock:
        print(json.dumps(enc(data)), flush=True)


# an optional third argument: the local address to connect from (long-polling only: the
# WebSocket of python-engineio 4.3 cannot be told one), as a client on another host would
http = None
if len(sys.argv) > 3:
    import requests

    class SourceAddress(requests.adapters.HTTPAdapter):
        def init_poolmanager(self, *args, **kw):
            kw["source_address"] = (sys.argv[3], 0)
            super().init_poolmanager(*args, **kw)

    http = requests.Session()
    http.mount("http://", SourceAddress())
sio = socketio.Client(reconnection=False, http_session=http)
trigger = sio.eio._trigger_event  # handle messages in order (see test/conftest.py)
sio.eio._trigger_event = lambda ev, *a, **kw: trigger(ev, *a, **dict(kw, run_async=False) if ev == "message" else kw)
sio.on("msg", show)
sio.connect(sys.argv[1], transports=None if sys.argv[2] == "default" else [sys.argv[2]])
for line in sys.stdin:
    cmd, _, arg = line.rstrip("\n").partition(" ")
    if cmd == "say":
        sio.emit("msg", {"action": "send msg", "username": "?", "msg": arg})
    elif cmd == "bin":
        sio.emit("msg", {"action": "send msg", "msg": "binary", "data": bytes.fromhex(arg)})
    elif cmd == "json":
        sio.emit("msg", json.loads(arg))
    elif cmd == "quit":
        break
sio.disconnect()
