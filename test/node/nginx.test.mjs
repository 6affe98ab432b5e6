// Two chatroom servers joined through Redis, behind a real nginx (Debian's), configured as
// README says: WebSocket upgrade headers, and ip_hash so that a long-polling client's
// requests all reach the same server. Clients come from several 127.0.x.1 addresses
// (ip_hash looks at the first three bytes), so that they land on both servers:
// socket.io-client 4 over WebSocket, over long-polling that upgrades, and over
// long-polling alone, and python-socketio over long-polling. All see one room.
import { test, after, before } from "node:test";
import assert from "node:assert/strict";
import { spawn, execFileSync } from "node:child_process";
import { createInterface } from "node:readline";
import { mkdtempSync, writeFileSync, chmodSync, existsSync } from "node:fs";
import { Agent } from "node:http";
import { connect, createServer } from "node:net";
import { tmpdir } from "node:os";
import { fileURLToPath } from "node:url";
import path from "node:path";
import { io } from "socket.io-client";
import { startServer, recorder, killAll } from "./server.mjs";

const here = path.dirname(fileURLToPath(import.meta.url));
const procs = [];
const closers = [];
let servers = [], nginxPort;

function freePort() {
  return new Promise((resolve) => {
    const s = createServer();
    s.listen(0, "127.0.0.1", () => { const { port } = s.address(); s.close(() => resolve(port)); });
  });
}

async function accepting(port) {
  for (let i = 0; i < 200; i++) {
    const up = await new Promise((resolve) => {
      const c = connect(port, "127.0.0.1");
      c.on("connect", () => { c.destroy(); resolve(true); });
      c.on("error", () => resolve(false));
    });
    if (up) return;
    await new Promise((r) => setTimeout(r, 25));
  }
  throw new Error(`nothing listens on ${port}`);
}

function start(cmd, args) {
  const proc = spawn(cmd, args, { stdio: ["ignore", "ignore", "inherit"] });
  procs.push(proc);
  return proc;
}

// The configuration README gives, with our ports and a scratch prefix.
function nginxConfig(dir, port, upstreams) {
  return `
daemon off;
worker_processes 1;
pid ${dir}/nginx.pid;
error_log ${dir}/error.log;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path ${dir}/body;
  proxy_temp_path ${dir}/proxy;
  fastcgi_temp_path ${dir}/fastcgi;
  uwsgi_temp_path ${dir}/uwsgi;
  scgi_temp_path ${dir}/scgi;

  map $http_upgrade $connection_upgrade { default upgrade; "" close; }
  upstream chatroom {
    ip_hash;
${upstreams.map((p) => `    server 127.0.0.1:${p};`).join("\n")}
  }
  server {
    listen 127.0.0.1:${port};
    location / {
      proxy_pass http://chatroom;
      proxy_http_version 1.1;
      proxy_set_header Upgrade $http_upgrade;
      proxy_set_header Connection $connection_upgrade;
      proxy_set_header Host $host;
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      proxy_read_timeout 60s;
      proxy_buffering off;
    }
  }
}
`;
}

before(async () => {
  const nginx = "/usr/sbin/nginx";
  assert.ok(existsSync(nginx), "nginx is missing: make test installs Debian's nginx");
  const redisPort = await freePort();
  start("redis-server", ["--port", String(redisPort), "--bind", "127.0.0.1", "--save", "",
                         "--appendonly", "no"]);
  await accepting(redisPort);
  for (let i = 0; i < 2; i++)
    servers.push(await startServer("--redis", `redis://127.0.0.1:${redisPort}`));
  const dir = mkdtempSync(path.join(tmpdir(), "chatroom-nginx-"));
  chmodSync(dir, 0o777); // nginx's workers run as another user when we are root
  nginxPort = await freePort();
  writeFileSync(path.join(dir, "nginx.conf"), nginxConfig(dir, nginxPort, servers.map((s) => s.port)));
  execFileSync(nginx, ["-t", "-q", "-p", dir, "-c", path.join(dir, "nginx.conf")]);
  start(nginx, ["-p", dir, "-c", path.join(dir, "nginx.conf")]);
  await accepting(nginxPort);
});

after(async () => {
  for (const close of closers) close();
  await new Promise((r) => setTimeout(r, 200));
  for (const s of servers) await s.stop();
  for (const p of procs) p.kill("SIGTERM");
  killAll();
});

async function node(source, transports) {
  const socket = io(`http://127.0.0.1:${nginxPort}`, {
    transports, reconnection: false, agent: new Agent({ localAddress: source }),
  });
  closers.push(() => socket.close());
  const rec = recorder(socket);
  await new Promise((resolve, reject) => {
    socket.on("connect", resolve);
    socket.on("connect_error", reject);
  });
  return { name: `socket.io-client 4 ${transports} from ${source}`, rec,
           say: (t) => socket.emit("msg", { action: "send msg", msg: t }) };
}

function python(source) {
  const proc = spawn("/usr/bin/python3",
                     [path.join(here, "python_chatter.py"), `http://127.0.0.1:${nginxPort}`, "polling", source],
                     { stdio: ["pipe", "pipe", "inherit"] });
  const msgs = [], waiters = [];
  createInterface({ input: proc.stdout }).on("line", (line) => {
    const m = JSON.parse(line);
    msgs.push(m);
    for (const w of [...waiters]) if (w.pred(m)) { waiters.splice(waiters.indexOf(w), 1); w.resolve(m); }
  });
  closers.push(() => proc.stdin.end("quit\n"));
  return {
    name: `python-socketio polling from ${source}`,
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
  };
}

async function members(server) {
  const text = await (await fetch(`${server.url}/metrics`)).text();
  return Number(/^chatroom_room_members (\d+)$/m.exec(text)[1]);
}

test("clients behind nginx land on both servers and share one room, in one order", async () => {
  const kinds = [["websocket"], ["polling", "websocket"], ["polling"]];
  const clients = [];
  for (let i = 0; i < 6; i++)
    clients.push(await node(`127.0.${11 + i}.1`, kinds[i % 3]));
  clients.push(python("127.0.17.1"), python("127.0.18.1"));
  const everyone = clients.length;
  // each has seen a login with everyone in name_list
  for (const c of clients)
    await c.rec.wait((m) => m.action === "login" && m.name_list.length === everyone, 15000);
  const here = await Promise.all(servers.map(members));
  assert.equal(here[0] + here[1], everyone);
  assert.ok(here[0] > 0 && here[1] > 0, `all on one server: ${here}`);

  const marks = clients.map((c) => c.rec.msgs.length);
  clients.forEach((c, i) => c.say(`hello ${i}`));
  for (const c of clients)
    for (let i = 0; i < everyone; i++)
      await c.rec.wait((m) => m.msg === `hello ${i}`, 15000);
  const seen = clients.map((c, k) => c.rec.msgs.slice(marks[k]).map((m) => m.msg ?? m.action));
  for (const [k, s] of seen.entries())
    assert.deepEqual(s, seen[0], `${clients[k].name} saw another order`);
});
