// socket.io-client 4 under Node.js, on every transport, speaking the chat contract.
import { test, after, before } from "node:test";
import assert from "node:assert/strict";
import { io } from "socket.io-client";
import { startServer, recorder } from "./server.mjs";

let server;
const sockets = [];

// Polls pred until it holds, at most ms milliseconds.
async function until(pred, ms, what) {
  for (const end = Date.now() + ms; Date.now() < end; await new Promise((r) => setTimeout(r, 20)))
    if (pred()) return;
  throw new Error(`timed out: ${what}`);
}

before(async () => { server = await startServer(); });
after(async () => {
  for (const s of sockets) s.disconnect();
  await server.stop();
});

async function join(transports) {
  const socket = io(server.url, { transports, reconnection: false, forceNew: true });
  sockets.push(socket);
  const rec = recorder(socket);
  await new Promise((resolve, reject) => {
    socket.on("connect", resolve);
    socket.on("connect_error", reject);
  });
  const me = await rec.wait((m) => m.action === "login");
  return { socket, rec, nick: me.username };
}

test("each transport joins, its own login first, name_list in join order", async () => {
  const a = await join(["websocket"]);
  const b = await join(["polling"]);
  const c = await join(undefined); // polling, then the upgrade
  assert.equal(a.rec.msgs[0].username, a.nick);
  assert.equal(b.rec.msgs[0].username, b.nick);
  assert.equal(c.rec.msgs[0].username, c.nick);
  const last = await a.rec.wait((m) => m.action === "login" && m.username === c.nick);
  assert.deepEqual(last.name_list, [[a.nick, a.socket.id], [b.nick, b.socket.id], [c.nick, c.socket.id]]);
  await until(() => c.socket.io.engine.transport.name === "websocket", 10000, "c upgraded");
});

test("messages are relayed to all with the sender's name; acks arrive", async () => {
  const a = await join(["websocket"]);
  const b = await join(["polling"]);
  await a.rec.wait((m) => m.username === b.nick);
  const ackArgs = await new Promise((resolve, reject) => {
    a.socket.timeout(5000).emit("msg",
      { action: "send msg", username: "someone else", msg: "hello from node" },
      (err, ...args) => (err ? reject(err) : resolve(args)));
  });
  assert.deepEqual(ackArgs, []); // acknowledged, with nothing to say
  for (const x of [a, b]) {
    const got = await x.rec.wait((m) => m.msg === "hello from node");
    assert.deepEqual(got, { action: "send msg", username: a.nick, msg: "hello from node" });
  }
});

test("binary attachments are relayed as binary", async () => {
  const a = await join(["polling"]);
  const b = await join(["websocket"]);
  await a.rec.wait((m) => m.username === b.nick);
  const bytes = Buffer.from([0, 1, 2, 250, 255]);
  a.socket.emit("msg", { action: "send msg", msg: "a file", file: bytes, parts: [Buffer.alloc(0), bytes] });
  for (const x of [a, b]) {
    const got = await x.rec.wait((m) => m.msg === "a file");
    assert.ok(Buffer.isBuffer(got.file) && got.file.equals(bytes));
    assert.equal(got.parts[0].length, 0);
    assert.ok(got.parts[1].equals(bytes));
    assert.equal(got.username, a.nick);
  }
});

test("twenty clients talking at once all see one order", async () => {
  const clients = [];
  for (let i = 0; i < 20; i++) clients.push(await join(i % 2 ? ["polling"] : ["websocket"]));
  const lastNick = clients[19].nick;
  await Promise.all(clients.map((c) => c.rec.wait((m) => m.username === lastNick)));
  const start = clients.map((c) => c.rec.msgs.length);
  clients.forEach((c, i) => { for (let k = 0; k < 10; k++) c.socket.emit("msg", { msg: `${i}:${k}` }); });
  await until(() => clients.every((c, i) => c.rec.msgs.slice(start[i]).filter((m) => m.msg).length >= 200),
              20000, "everyone got all 200");
  const seqs = clients.map((c, i) => c.rec.msgs.slice(start[i]).filter((m) => m.msg).map((m) => m.msg));
  for (const s of seqs) assert.deepEqual(s, seqs[0]);
  assert.equal(seqs[0].length, 200);
});

test("leaving is announced with the new name_list", async () => {
  const a = await join(["websocket"]);
  const b = await join(["polling"]);
  await a.rec.wait((m) => m.username === b.nick);
  const before = a.rec.msgs.length;
  b.socket.disconnect();
  const out = await a.rec.wait((m) => m.action === "logout" && m.username === b.nick);
  assert.ok(!out.name_list.some(([n]) => n === b.nick));
  assert.ok(out.name_list.some(([n, sid]) => n === a.nick && sid === a.socket.id));
  assert.ok(a.rec.msgs.length > before);
});
