// Connection state recovery with socket.io-client 4 (Node): a client that asks for it
// ({recovery: true} in its auth) and loses its transport comes back with its old id and
// nickname, gets what it missed once and in order, and the others see nothing of it.
import { test, after, before } from "node:test";
import assert from "node:assert/strict";
import { io } from "socket.io-client";
import { startServer, recorder } from "./server.mjs";

let server;
const sockets = [];

before(async () => { server = await startServer("--recovery-window", "2"); });
after(async () => {
  for (const s of sockets) s.disconnect();
  await server.stop();
});

async function join(options = {}) {
  const socket = io(server.url, { reconnection: true, reconnectionDelay: 100,
                                  reconnectionDelayMax: 100, forceNew: true, ...options });
  sockets.push(socket);
  const rec = recorder(socket);
  await new Promise((resolve, reject) => {
    socket.once("connect", resolve);
    socket.once("connect_error", reject);
  });
  const me = await rec.wait((m) => m.action === "login");
  return { socket, rec, nick: me.username };
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const said = (rec, text) => rec.msgs.filter((m) => m.msg === text).length;

for (const transports of [["websocket"], ["polling"]]) {
  test(`over ${transports[0]}: a blip costs nobody their name`, async () => {
    const a = await join({ transports, auth: { recovery: true } });
    const b = await join({ transports: ["websocket"] });
    await a.rec.wait((m) => m.action === "login" && m.username === b.nick);
    const id = a.socket.id;
    const back = new Promise((resolve) => a.socket.once("connect", resolve));
    a.socket.io.engine.close(); // the transport goes, as on a network switch
    b.socket.emit("msg", { action: "send msg", msg: "while you were away 1" });
    b.socket.emit("msg", { action: "send msg", msg: "while you were away 2" });
    await back;
    assert.equal(a.socket.recovered, true);
    assert.equal(a.socket.id, id);
    await a.rec.wait((m) => m.msg === "while you were away 2");
    b.socket.emit("msg", { action: "send msg", msg: "after" });
    await a.rec.wait((m) => m.msg === "after");
    const texts = a.rec.msgs.map((m) => m.msg).filter(Boolean);
    assert.deepEqual(texts.slice(-3), ["while you were away 1", "while you were away 2", "after"]);
    assert.equal(said(a.rec, "while you were away 1"), 1);
    // the others saw no logout and no new login; a is still in the room with its name
    await b.rec.wait((m) => m.msg === "after");
    assert.equal(b.rec.msgs.filter((m) => m.username === a.nick && m.action).length, 0);
    const c = await join({ transports: ["websocket"] }); // and a newcomer finds it there
    const list = (await c.rec.wait((m) => m.action === "login")).name_list;
    assert.deepEqual(list.map(([name]) => name).slice(-3), [a.nick, b.nick, c.nick]);
    c.socket.disconnect();
    a.socket.disconnect();
    b.socket.disconnect();
  });
}

test("one that does not come back is logged out when the window ends", async () => {
  const a = await join({ transports: ["websocket"], auth: { recovery: true },
                         reconnectionDelay: 5000, reconnectionDelayMax: 5000 });
  const b = await join({ transports: ["websocket"] });
  const gone = Date.now();
  a.socket.io.engine.close();
  const out = await b.rec.wait((m) => m.action === "logout" && m.username === a.nick, 10000);
  const took = Date.now() - gone;
  // never before the window ends; after it, seconds to spare for a loaded machine
  assert.ok(took >= 1900 && took < 6000, `logout after ${took} ms, the window is 2 s`);
  assert.ok(!out.name_list.some(([name]) => name === a.nick));
  a.socket.disconnect();
  b.socket.disconnect();
});

test("an explicit disconnect is a logout at once", async () => {
  const a = await join({ transports: ["websocket"], auth: { recovery: true } });
  const b = await join({ transports: ["websocket"] });
  const gone = Date.now();
  a.socket.disconnect();
  await b.rec.wait((m) => m.action === "logout" && m.username === a.nick, 1000);
  assert.ok(Date.now() - gone < 1000);
  b.socket.disconnect();
});

test("a client that did not ask for recovery is logged out at once, as always", async () => {
  const a = await join({ transports: ["websocket"], reconnection: false });
  const b = await join({ transports: ["websocket"] });
  const gone = Date.now();
  a.socket.io.engine.close();
  await b.rec.wait((m) => m.action === "logout" && m.username === a.nick, 1000);
  assert.ok(Date.now() - gone < 1000);
  // and it never saw an offset: its events are as the contract has them
  assert.ok(a.rec.msgs.every((m) => typeof m === "object"));
  b.socket.disconnect();
});
