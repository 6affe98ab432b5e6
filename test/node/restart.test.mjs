// A restart, as systemctl restart does it: SIGTERM, then a new server on the same port.
// socket.io-client 2, 3 and 4, over WebSocket and over long-polling, all come back by
// themselves and join again. (python-socketio: test/test_startup.py.)
import { test } from "node:test";
import assert from "node:assert/strict";
import { io as io4 } from "socket.io-client";
import { io as io3 } from "socket.io-client-v3";
import io2 from "socket.io-client-v2";
import { startServer } from "./server.mjs";

function client(kind, url, transports) {
  const options = { transports, forceNew: true, reconnection: true,
                    reconnectionDelay: 200, reconnectionDelayMax: 500 };
  const socket = kind === 2 ? io2(url, options) : kind === 3 ? io3(url, options) : io4(url, options);
  const logins = []; // its own logins: the first msg after each connection
  let fresh = false;
  socket.on("connect", () => { fresh = true; });
  socket.on("msg", (m) => {
    if (fresh && m.action === "login") { fresh = false; logins.push(m.username); }
  });
  return { socket, logins, name: `socket.io-client ${kind} over ${transports[0]}` };
}

async function until(pred, ms, what) {
  for (const end = Date.now() + ms; Date.now() < end; await new Promise((r) => setTimeout(r, 25)))
    if (pred()) return;
  throw new Error(`timed out: ${what}`);
}

test("every socket.io-client comes back after a restart", async () => {
  const first = await startServer();
  const clients = [];
  for (const kind of [2, 3, 4])
    for (const transport of ["websocket", "polling"])
      clients.push(client(kind, first.url, [transport]));
  await until(() => clients.every((c) => c.logins.length === 1), 10000, "everyone joined");
  await new Promise((r) => setTimeout(r, 300)); // long-polls are waiting in the server
  await first.stop();
  const again = await startServer("--port", String(first.port));
  try {
    for (const c of clients)
      await until(() => c.logins.length === 2, 10000, `${c.name} came back`);
    for (const c of clients)
      assert.equal(c.socket.connected, true, c.name);
  } finally {
    for (const c of clients) c.socket.close();
    await again.stop();
  }
});
