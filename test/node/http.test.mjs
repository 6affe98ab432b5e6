// Node's own HTTP clients, several requests in a row on kept-alive connections: the
// default agent of node:http (keep-alive since Node 19), fetch (undici), and requests
// that say "Connection: close" as node-fetch without an agent does. A server that closes
// a connection without saying "Connection: close" makes the next request on it fail with
// "socket hang up" (RFC 9112, section 9.6); the official protocol suites hit exactly that.
import { test, after, before } from "node:test";
import assert from "node:assert/strict";
import http from "node:http";
import { startServer } from "./server.mjs";

// Node 20's default agent keeps connections alive; Debian 12's Node 18 does not: the same
// agent, whatever the version
const agent = new http.Agent({ keepAlive: true });

let server;
before(async () => { server = await startServer(); });
after(async () => { agent.destroy(); await server.stop(); });

// One request with that agent; resolves with status, headers and body.
function request(method, path, { body = "", headers = {} } = {}) {
  return new Promise((resolve, reject) => {
    const req = http.request(`${server.url}${path}`, { method, headers, agent }, (res) => {
      let text = "";
      res.setEncoding("utf8");
      res.on("data", (d) => (text += d));
      res.on("end", () => resolve({ status: res.statusCode, headers: res.headers, text }));
    });
    req.on("error", reject);
    req.end(body);
  });
}

const EIO = "/socket.io/?EIO=4&transport=polling";

async function session(headers = {}) {
  const r = await request("GET", EIO, { headers });
  assert.equal(r.status, 200);
  return JSON.parse(r.text.slice(1)).sid;
}

test("node:http's keep-alive agent, request after request, answers of every kind", async () => {
  assert.equal(agent.keepAlive, true);
  for (let round = 0; round < 3; round++) {
    const sid = await session();
    assert.equal((await request("POST", `${EIO}&sid=${sid}`, { body: "40" })).text, "ok");
    const got = await request("GET", `${EIO}&sid=${sid}`);
    assert.match(got.text, /^40\{"sid":"/);
    assert.equal((await request("GET", "/socket.io/?EIO=9&transport=polling")).status, 400);
    assert.equal((await request("GET", "/nowhere")).status, 404);
    assert.equal((await request("GET", "/")).status, 200);
    assert.equal((await request("POST", `${EIO}&sid=${sid}`, { body: "1" })).status, 200);
    assert.equal((await request("GET", `${EIO}&sid=${sid}`)).status, 400);
  }
});

test("requests that ask for Connection: close, as node-fetch sends them", async () => {
  const close = { Connection: "close" };
  for (let i = 0; i < 5; i++) {
    const sid = await session(close);
    const r = await request("POST", `${EIO}&sid=${sid}`, { body: "40", headers: close });
    assert.equal(r.headers.connection, "close");
    const got = await request("GET", `${EIO}&sid=${sid}`, { headers: close });
    assert.equal(got.headers.connection, "close");
    assert.match(got.text, /^40/);
    // and the agent's kept-alive sockets go on working after these
    assert.equal((await request("GET", "/")).status, 200);
  }
});

test("fetch (undici), request after request", async () => {
  for (let i = 0; i < 5; i++) {
    const open = await fetch(`${server.url}${EIO}`);
    const sid = JSON.parse((await open.text()).slice(1)).sid;
    const post = await fetch(`${server.url}${EIO}&sid=${sid}`, { method: "POST", body: "40" });
    assert.equal(await post.text(), "ok");
    const get = await fetch(`${server.url}${EIO}&sid=${sid}`);
    assert.match(await get.text(), /^40/);
    const bad = await fetch(`${server.url}/socket.io/?EIO=4&transport=polling&sid=nope`);
    assert.equal(bad.status, 400);
    await bad.text();
  }
});

// The official Engine.IO suite's upgrade race: "2probe" and "5" go out the moment the
// WebSocket opens, then at once a GET on a connection kept alive from before. A server
// with one thread reads them in that order; chatroom must too (its wire thread watches the
// socket before the 101 goes out), so the GET finds the session upgraded: 400, each time.
test("a GET sent right after the upgrade finds it done", async () => {
  const { default: WebSocket } = await import("../node_modules/ws/index.js");
  const base = server.url.replace("http", "ws");
  for (let i = 0; i < 200; i++) {
    const sid = await session();
    const ws = new WebSocket(`${base}/socket.io/?EIO=4&transport=websocket&sid=${sid}`);
    const messages = [];
    ws.on("message", (m) => messages.push(String(m)));
    await new Promise((resolve, reject) => { ws.on("open", resolve); ws.on("error", reject); });
    ws.send("2probe");
    ws.send("5");
    const late = await request("GET", `${EIO}&sid=${sid}`);
    assert.equal(late.status, 400, `round ${i}: ${late.text}`);
    ws.close();
  }
});
