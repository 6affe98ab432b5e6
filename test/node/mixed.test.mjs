// One room, four kinds of client at once: socket.io-client 2 (Engine.IO 3) over polling
// and over WebSocket, socket.io-client 4, and python-socketio. Engine.IO 3 clients ping
// the server themselves; a short ping interval makes them do it often.
import { test, after, before } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";
import path from "node:path";
import { io as io4 } from "socket.io-client";
import io2 from "socket.io-client-v2";
import { startServer, recorder } from "./server.mjs";

const here = path.dirname(fileURLToPath(import.meta.url));
let server;
const closers = [];

before(async () => { server = await startServer("--ping-interval", "500", "--ping-timeout", "400"); });
after(async () => {
  for (const close of closers) close();
  await server.stop();
});

function connected(socket) {
  return new Promise((resolve, reject) => {
    socket.on("connect", resolve);
    socket.on("connect_error", reject);
    socket.on("error", reject);
  });
}

async function v4(transports) {
  const socket = io4(server.url, { transports, reconnection: false, forceNew: true });
  closers.push(() => socket.disconnect());
  const rec = recorder(socket);
  await connected(socket);
  return { name: `v4 ${transports}`, rec, socket, say: (t) => socket.emit("msg", { action: "send msg", msg: t }) };
}

async function v2(transports) {
  const socket = io2(server.url, { transports, reconnection: false, forceNew: true });
  closers.push(() => socket.close());
  const rec = recorder(socket);
  await connected(socket);
  return { name: `v2 ${transports}`, rec, socket, say: (t) => socket.emit("msg", { action: "send msg", msg: t }) };
}

function python(transport) {
  const proc = spawn("/usr/bin/python3", [path.join(here, "python_chatter.py"), server.url, transport], {
    stdio: ["pipe", "pipe", "inherit"],
  });
  const msgs = [];
  const waiters = [];
  createInterface({ input: proc.stdout }).on("line", (line) => {
    const m = JSON.parse(line);
    msgs.push(m);
    for (const w of [...waiters]) if (w.pred(m)) { waiters.splice(waiters.indexOf(w), 1); w.resolve(m); }
  });
  closers.push(() => { proc.stdin.end("quit\n"); });
  return {
    name: `python ${transport}`,
    rec: {
      msgs,
      wait(pred, ms = 10000) {
        const found = msgs.find(pred);
        if (found) return Promise.resolve(found);
        return new Promise((resolve, reject) => {
          waiters.push({ pred, resolve });
          setTimeout(() => reject(new Error("python client: no matching msg")), ms).unref();
        });
      },
    },
    say: (t) => proc.stdin.write(`say ${t}\n`),
    sendBinary: (hex) => proc.stdin.write(`bin ${hex}\n`),
  };
}

test("Engine.IO 3 and 4 clients and python-socketio chat in one room", async () => {
  const clients = [await v2(["polling"]), await v2(["websocket"]), await v4(["websocket"]), python("default")];
  const py = clients[3];
  const pyMe = await py.rec.wait((m) => m.action === "login");
  await Promise.all(clients.map((c) => c.rec.wait((m) => m.action === "login" && m.username === pyMe.username)));
  const start = clients.map((c) => c.rec.msgs.length);
  for (let k = 0; k < 5; k++) for (const c of clients) c.say(`${c.name} #${k}`);
  py.sendBinary("00ff10");
  clients[0].socket.emit("msg", { action: "send msg", msg: "binary", data: Buffer.from([7, 8, 9]) });
  for (const c of clients) await c.rec.wait((m) => m.msg === `${py.name} #4`);
  await Promise.all(clients.map((c) => c.rec.wait((m) => m.msg === "binary" && c.rec.msgs.filter((x) => x.msg === "binary").length === 2)));
  const seqs = clients.map((c, i) => c.rec.msgs.slice(start[i]).filter((m) => m.msg).map((m) => m.msg));
  for (const s of seqs) assert.deepEqual(s, seqs[0]);
  assert.equal(seqs[0].filter((m) => m !== "binary").length, 20);
  // binary crossed between the protocols intact
  const fromPy = clients[0].rec.msgs.find((m) => m.msg === "binary" && m.username === pyMe.username);
  assert.ok(Buffer.from([0, 0xff, 0x10]).equals(fromPy.data));
  const fromV2 = py.rec.msgs.find((m) => m.msg === "binary" && m.username !== pyMe.username);
  assert.deepEqual(fromV2.data, { bytes: "070809" });
  // several heartbeats later nobody has left, and the v2 clients keep their transports
  await new Promise((r) => setTimeout(r, 2000));
  for (const c of clients) assert.ok(!c.rec.msgs.some((m) => m.action === "logout"), c.name);
  assert.equal(clients[0].socket.io.engine.transport.name, "polling");
  assert.equal(clients[1].socket.io.engine.transport.name, "websocket");
});

test("an Engine.IO 3 client upgrades from polling to WebSocket", async () => {
  const c = await v2(["polling", "websocket"]);
  await c.rec.wait((m) => m.action === "login");
  for (const end = Date.now() + 10000; c.socket.io.engine.transport.name !== "websocket";
       await new Promise((r) => setTimeout(r, 20)))
    assert.ok(Date.now() < end, "it did not upgrade within 10 s");
  c.say("after the upgrade");
  await c.rec.wait((m) => m.msg === "after the upgrade");
});
