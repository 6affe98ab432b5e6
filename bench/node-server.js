// The reference: chatroom's chat contract on Node.js socket.io 4, for the benchmark.
// Same names list, same login/logout/msg events, the same delta presence for clients
// that ask for it (auth {"presence":"delta"}), so the two servers do the same work.
//
//   node bench/node-server.js PORT [NAMES_FILE]
//
// With REDIS_URL=redis://HOST:PORT in its environment it joins the other Node servers of
// that Redis through @socket.io/redis-adapter, as Socket.IO's documentation does it: an
// event is emitted locally and published to the others. (Presence stays per server: each
// name_list holds this server's members only, less work than chatroom's whole-room list.)
"use strict";
const http = require("http");
const fs = require("fs");
const path = require("path");
const { Server } = require("socket.io");

const port = Number(process.argv[2] || 5000);
const namesFile = process.argv[3] || path.join(__dirname, "..", "name.txt");
const names = [...new Set(fs.readFileSync(namesFile, "utf8").split("\n").map((s) => s.trim()).filter(Boolean))];

const free = names.map((_, i) => i); // indexes of names nobody holds
const held = new Set();              // every nickname in use
function pick() {
  if (free.length) {
    const i = Math.floor(Math.random() * free.length);
    const name = names[free[i]];
    free[i] = free[free.length - 1];
    free.pop();
    held.add(name);
    return name;
  }
  const base = names[Math.floor(Math.random() * names.length)];
  for (let k = 2; ; k++) {
    const name = `${base}#${k}`;
    if (!held.has(name)) { held.add(name); return name; }
  }
}
function release(name) {
  held.delete(name);
  const i = names.indexOf(name);
  if (i >= 0) free.push(i);
}

const httpServer = http.createServer();
const io = new Server(httpServer, { serveClient: false, pingInterval: 25000, pingTimeout: 20000,
                                    maxHttpBufferSize: 1e6 });
const members = new Map(); // socket id -> nickname, in join order

function nameList() { return [...members].map(([sid, nick]) => [nick, sid]); }

io.on("connection", (socket) => {
  const delta = !!(socket.handshake.auth && socket.handshake.auth.presence === "delta");
  const nick = pick();
  members.set(socket.id, nick);
  socket.join(delta ? "delta" : "full");
  const list = nameList();
  io.to("full").emit("msg", { username: nick, action: "login", name_list: list });
  if (delta) {
    socket.emit("msg", { username: nick, action: "login", name_list: list });
    socket.to("delta").emit("msg", { action: "login", username: nick, sid: socket.id });
  } else {
    io.to("delta").emit("msg", { action: "login", username: nick, sid: socket.id });
  }

  socket.on("msg", (data, ack) => {
    if (data && typeof data === "object" && !Array.isArray(data)) data.username = nick;
    io.emit("msg", data);
    if (typeof ack === "function") ack();
  });

  socket.on("disconnect", () => {
    members.delete(socket.id);
    release(nick);
    io.to("full").emit("msg", { action: "logout", username: nick, name_list: nameList() });
    io.to("delta").emit("msg", { action: "logout", username: nick, sid: socket.id });
  });
});

async function listen() {
  if (process.env.REDIS_URL) {
    const { createClient } = require("redis");
    const { createAdapter } = require("@socket.io/redis-adapter");
    const pub = createClient({ url: process.env.REDIS_URL });
    const sub = pub.duplicate();
    await Promise.all([pub.connect(), sub.connect()]);
    io.adapter(createAdapter(pub, sub));
  }
  httpServer.listen(port, "127.0.0.1", () =>
    console.log(`node socket.io ${require("socket.io/package.json").version} on ${port}`));
}
listen();
process.on("SIGTERM", () => { io.close(); process.exit(0); });
