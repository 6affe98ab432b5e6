// The web page, in headless Chromium (Debian's, driven by playwright-core): two pages and
// a python-socketio client chat; scrolling follows or stays; nothing from others runs as
// HTML; Enter and Shift+Enter; reconnecting after a restart; history; two screen sizes.
import { test, after, before } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { createInterface } from "node:readline";
import { existsSync, mkdirSync, readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import path from "node:path";
import { chromium } from "playwright-core";
import { killAll, startServer } from "./server.mjs";

const here = path.dirname(fileURLToPath(import.meta.url));
const artifacts = path.join(here, "..", "artifacts");
mkdirSync(artifacts, { recursive: true });
// Debian's chromium, or Ubuntu's (a snap, which chromium-browser installs)
const CHROMIUM = process.env.CHROMIUM ||
  ["/usr/bin/chromium", "/snap/bin/chromium"].find((p) => existsSync(p)) || "/usr/bin/chromium";
let browser;

before(async () => {
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
});
const pythons = new Set();
after(async () => {  // what a failed test left behind
  for (const proc of pythons) proc.kill();
  killAll();
  await browser.close();
});

async function openPage(server, viewport = { width: 1280, height: 800 }) {
  const page = await browser.newPage({ viewport });
  page.dialogs = [];
  page.on("dialog", (d) => { page.dialogs.push(d.message()); d.dismiss(); });
  page.errors = [];
  page.on("pageerror", (e) => page.errors.push(String(e)));
  await page.goto(server.url + "/");
  await page.waitForSelector("#me b");
  page.nick = await page.textContent("#me b");
  return page;
}

async function say(page, text) {
  await page.fill("#input", text);
  await page.press("#input", "Enter");
}

function texts(page) {
  return page.$$eval("#messages .msg .text", (els) => els.map((e) => e.textContent));
}

async function waitText(page, text, timeout = 10000) {
  await page.waitForFunction((t) => [...document.querySelectorAll("#messages .msg .text")]
    .some((e) => e.textContent === t), text, { timeout });
}

// A python-socketio client, driven through test/node/python_chatter.py.
function python(server) {
  const proc = spawn("/usr/bin/python3", [path.join(here, "python_chatter.py"), server.url, "websocket"],
                     { stdio: ["pipe", "pipe", "inherit"] });
  pythons.add(proc);
  proc.on("exit", () => pythons.delete(proc));
  const msgs = [];
  createInterface({ input: proc.stdout }).on("line", (l) => msgs.push(JSON.parse(l)));
  return {
    msgs,
    say: (t) => proc.stdin.write(`say ${t.replaceAll("\n", " ")}\n`),
    send: (data) => proc.stdin.write(`json ${JSON.stringify(data)}\n`),
    async waitFor(pred, ms = 10000) {
      for (const end = Date.now() + ms; Date.now() < end; await new Promise((r) => setTimeout(r, 20)))
        if (msgs.find(pred)) return msgs.find(pred);
      throw new Error("python client: nothing matched");
    },
    quit: () => proc.stdin.end("quit\n"),
  };
}

function scrollState(page) {
  return page.$eval("#messages", (m) => ({
    top: m.scrollTop, atBottom: m.scrollHeight - m.scrollTop - m.clientHeight < 2,
    button: !document.querySelector("#new-messages").hidden,
  }));
}

test("two pages and a python client chat; the page lists who is online", async () => {
  const server = await startServer();
  const a = await openPage(server), b = await openPage(server);
  const py = python(server);
  const pyNick = (await py.waitFor((m) => m.action === "login")).username;
  await a.waitForFunction((n) => document.querySelector("#people-list").textContent.includes(n), pyNick);
  assert.equal(await a.$$eval("#people-list li", (l) => l.length), 3);
  await say(a, "hello from page A");
  await waitText(b, "hello from page A");
  const fromA = await py.waitFor((m) => m.msg === "hello from page A");
  assert.equal(fromA.username, a.nick);
  py.say("hi from python");
  await waitText(a, "hi from python");
  await waitText(b, "hi from python");
  const events = (p) => p.$$eval("#messages .event", (els) => els.map((e) => e.textContent));
  assert.ok((await events(a)).includes(`${b.nick} joined`));
  for (const p of [a, b]) assert.ok((await events(p)).includes(`${pyNick} joined`));
  py.quit();
  // whoever leaves is said to have left, and is no longer listed as online
  for (const p of [a, b]) {
    await p.waitForFunction((n) => document.querySelector("#messages").textContent.includes(`${n} left`), pyNick);
    await p.waitForFunction(() => document.querySelector("#people-count").textContent === "Online — 2");
    const online = await p.$$eval("#people-list li", (l) => l.map((e) => e.textContent));
    assert.deepEqual(online.map((t) => t.replace(" (you)", "")).sort(), [a.nick, b.nick].sort());
  }
  assert.deepEqual([a.errors, b.errors], [[], []]);
  await a.close(); await b.close();
  await server.stop();
});

test("without WebSocket the page falls back to long-polling", async () => {
  const server = await startServer();
  const page = await browser.newPage();
  await page.addInitScript(() => { window.WebSocket = function () { throw new Error("blocked"); }; });
  await page.goto(server.url + "/");
  await page.waitForSelector("#me b");
  const other = await openPage(server);
  await say(page, "sent over polling");
  await waitText(other, "sent over polling");
  await say(other, "and back");
  await waitText(page, "and back");
  await page.close(); await other.close();
  await server.stop();
});

test("Enter sends, Shift+Enter breaks the line, empty is not sent, the box clears", async () => {
  const server = await startServer();
  const a = await openPage(server);
  await a.fill("#input", "line one");
  await a.press("#input", "Shift+Enter");
  await a.type("#input", "line two");
  await a.press("#input", "Enter");
  await waitText(a, "line one\nline two");
  assert.equal(await a.inputValue("#input"), "");
  await a.fill("#input", "   \n  ");
  await a.press("#input", "Enter");
  await a.click("#send");
  // messages come back in the order they were sent: one sent after the empty one shows
  // that the empty one was not
  await a.fill("#input", "after");
  await a.press("#input", "Enter");
  await waitText(a, "after");
  assert.deepEqual(await texts(a), ["line one\nline two", "after"]);
  await a.close();
  await server.stop();
});

test("what others send is shown as text and runs nothing", async () => {
  const server = await startServer();
  const a = await openPage(server);
  const py = python(server);
  await py.waitFor((m) => m.action === "login");
  const attack = "<img src=x onerror=alert(1)><script>alert(2)</script>";
  py.say(attack);
  await waitText(a, attack);
  await a.waitForTimeout(500);
  assert.equal(await a.$$eval("#messages img, #messages script", (l) => l.length), 0);
  assert.deepEqual(a.dialogs, []);
  py.quit();
  await a.close();
  await server.stop();
});

test("autoscroll: follows at the bottom, stays put when scrolled up, button jumps down", async () => {
  const server = await startServer("--flood-limit", "0");
  const a = await openPage(server);
  const py = python(server);
  await py.waitFor((m) => m.action === "login");
  for (let i = 0; i < 200; i++) py.say(`first batch ${i}`);
  await waitText(a, "first batch 199");
  let s = await scrollState(a);  // each message scrolls as it is added: nothing to wait for
  assert.ok(s.atBottom && !s.button, JSON.stringify(s));  // followed every one of them
  const readingAt = await a.$eval("#messages", (m) => { m.scrollTop = m.scrollHeight / 3; return m.scrollTop; });
  for (let i = 0; i < 200; i++) py.say(`second batch ${i}`);
  await waitText(a, "second batch 199");
  s = await scrollState(a);
  assert.ok(Math.abs(s.top - readingAt) <= 1 && !s.atBottom, JSON.stringify(s)); // stayed
  assert.ok(s.button);                                                           // and says so
  await a.click("#new-messages");
  s = await scrollState(a);
  assert.ok(s.atBottom && !s.button, JSON.stringify(s));
  py.quit();
  await a.close();
  await server.stop();
});

test("long words wrap, and the page works at 360 px", async () => {
  const server = await startServer();
  const small = await openPage(server, { width: 360, height: 740 });
  const word = "x".repeat(400);
  await say(small, word);
  await waitText(small, word);
  const overflow = await small.$eval("#messages", (m) => m.scrollWidth - m.clientWidth);
  assert.ok(overflow <= 0, `horizontal overflow ${overflow}px`);
  await small.click("#people-toggle");
  assert.ok(await small.isVisible("#people-list"));
  await small.close();
  await server.stop();
});

test("the page says it is disconnected and comes back when the server does", async () => {
  let server = await startServer();
  const a = await openPage(server);
  const port = server.port;
  await server.stop();
  await a.waitForSelector("#status.offline", { timeout: 10000 });
  assert.match(await a.textContent("#status"), /reconnecting/);
  server = await startServer("--port", String(port));
  await a.waitForSelector("#status.online", { timeout: 15000 });
  await a.waitForFunction(() => document.querySelector("#messages").textContent.includes("Reconnected as"));
  await say(a, "back again");
  await waitText(a, "back again");
  await a.close();
  await server.stop();
});

test("a newcomer sees the last messages above its own arrival", async () => {
  const server = await startServer("--history", "5");
  const a = await openPage(server);
  for (let i = 0; i < 8; i++) { await say(a, `message ${i}`); await waitText(a, `message ${i}`); }
  const b = await openPage(server);
  await b.waitForSelector("#messages .divider");
  assert.deepEqual(await texts(b), ["message 3", "message 4", "message 5", "message 6", "message 7"]);
  const order = await b.$$eval("#messages > *", (els) => els.map((e) => e.className));
  assert.equal(order[0], "divider");
  assert.ok(order.indexOf("event") > order.lastIndexOf("msg earlier"));
  await a.close(); await b.close();
  await server.stop();
});

test("after a blip the page has its name, what it missed once, and no join of its own", async () => {
  const server = await startServer();
  const page = await openPage(server);
  const py = python(server);
  await py.waitFor((m) => m.action === "login");
  await say(page, "before the blip");
  await waitText(page, "before the blip");
  const events = () => page.$$eval("#messages .event", (els) => els.map((e) => e.textContent));
  const joinsBefore = (await events()).filter((t) => t.includes("joined")).length;
  await page.evaluate(() => conn.ws.close()); // the transport goes; the page comes back
  py.say("missed one");
  py.say("missed two");
  await waitText(page, "missed two");
  await page.waitForFunction(() => document.querySelector("#status").className === "online");
  assert.equal(await page.textContent("#me b"), page.nick);
  const after = await events();
  assert.equal(after.filter((t) => t.includes("joined")).length, joinsBefore);
  assert.ok(!after.some((t) => t.includes("Reconnected as")));
  const all = await texts(page);
  assert.equal(all.filter((t) => t === "missed one").length, 1);
  assert.equal(all.filter((t) => t === "missed two").length, 1);
  assert.ok(all.indexOf("missed one") < all.indexOf("missed two"));
  await say(page, "back again");
  assert.equal((await py.waitFor((m) => m.msg === "back again")).username, page.nick);
  // the python client saw it neither leave nor come again
  assert.ok(!py.msgs.some((m) => ["login", "logout"].includes(m.action) && m.username === page.nick));
  assert.deepEqual(page.errors, []);
  py.quit();
  await page.close();
  await server.stop();
});

test("screenshots at 1280x800 and 360x740", async () => {
  const server = await startServer();
  const wide = await openPage(server, { width: 1280, height: 800 });
  const narrow = await openPage(server, { width: 360, height: 740 });
  const py = python(server);
  await py.waitFor((m) => m.action === "login");
  const lines = [[wide, "Hello everyone!"], [narrow, "Hi! Anyone up for the homework tonight?"],
                 [wide, "Sure, let's meet at 7.\nI'll bring the notes."], [null, "count me in"],
                 [narrow, "a-really-long-link-like-thing-" + "without-spaces-".repeat(6)]];
  for (const [page, text] of lines) {
    if (page) await say(page, text); else py.say(text);
    await waitText(wide, text.replace(/\n/g, "\n"));
  }
  await waitText(narrow, lines[4][1]);
  await wide.screenshot({ path: path.join(artifacts, "page-1280x800.png") });
  await narrow.screenshot({ path: path.join(artifacts, "page-360x740.png") });
  py.quit();
  await wide.close(); await narrow.close();
  await server.stop();
});

test("a screenshot with every nickname in name.txt, each legible", async () => {
  // Every script of the names list needs a font on the machine (test/test_fonts.py
  // checks each character); this is the picture to look at.
  const names = readFileSync(path.join(here, "..", "..", "name.txt"), "utf8")
    .split("\n").map((n) => n.trim()).filter(Boolean);
  const server = await startServer();
  const page = await openPage(server, { width: 1280, height: 1400 });
  const py = python(server);
  await py.waitFor((m) => m.action === "login");
  const lines = [];
  for (let i = 0; i < names.length; i += 36) lines.push(names.slice(i, i + 36).join(" · "));
  for (const line of lines) {
    py.say(line);
    await waitText(page, line);
  }
  await page.screenshot({ path: path.join(artifacts, "page-every-name.png") });
  py.quit();
  await page.close();
  await server.stop();
});

// The time of day a page shows for a timestamp: as the browser writes hours and minutes.
function clockIn(page, t) {
  return page.evaluate((t) => new Date(t).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" }), t);
}

test("the page asks for presence deltas and shows each message's time", async () => {
  const server = await startServer();
  const page = await browser.newPage();
  const sent = [];
  page.on("websocket", (ws) => ws.on("framesent", (f) => sent.push(String(f.payload))));
  await page.goto(server.url + "/");
  await page.waitForSelector("#me b");
  const connect = sent.find((f) => f.startsWith("40"));
  assert.ok(connect, JSON.stringify(sent));
  assert.equal(JSON.parse(connect.slice(2)).presence, "delta");
  const py = python(server);
  await py.waitFor((m) => m.action === "login");
  // the page's own messages carry their time, and show it
  await say(page, "what time is it");
  const mine = await py.waitFor((m) => m.msg === "what time is it");
  assert.equal(typeof mine.time, "number");
  assert.ok(Math.abs(mine.time - Date.now()) < 60000, `time ${mine.time}`);
  const when = (text) => page.$$eval("#messages .msg", (els, t) => els.filter((e) => e.querySelector(".text").textContent === t)
    .map((e) => e.querySelector(".when").textContent), text);
  // (the page may show it a moment after the python client has it)
  await page.waitForFunction((t) => [...document.querySelectorAll("#messages .msg .text")]
    .some((e) => e.textContent === t), "what time is it");
  assert.deepEqual(await when("what time is it"), [await clockIn(page, mine.time)]);
  // and so do others': the time in the message, not the time it arrived
  const then = Date.now() - (3 * 3600 + 17 * 60) * 1000;
  py.send({ action: "send msg", msg: "from the past", time: then });
  await waitText(page, "from the past");
  assert.deepEqual(await when("from the past"), [await clockIn(page, then)]);
  assert.notEqual(await clockIn(page, then), await clockIn(page, Date.now()));
  py.quit();
  await page.close();
  await server.stop();
});

test("the page loads nothing from the internet", async () => {
  const server = await startServer("--history", "5");
  const context = await browser.newContext();
  const loopback = (url) => ["127.0.0.1", "localhost", "[::1]"].includes(new URL(url).hostname);
  const outside = [];
  await context.route("**/*", (route) => {
    if (loopback(route.request().url())) return route.continue();
    outside.push(route.request().url());
    return route.abort();
  });
  const page = await context.newPage();
  page.on("request", (r) => { if (!r.url().startsWith("data:") && !loopback(r.url())) outside.push(r.url()); });
  page.on("websocket", (ws) => { if (!loopback(ws.url())) outside.push(ws.url()); });
  await page.addInitScript(() => {
    window.refused = [];
    document.addEventListener("securitypolicyviolation", (e) => window.refused.push(`${e.violatedDirective} ${e.blockedURI}`));
  });
  const response = await page.goto(server.url + "/");
  // and if anything ever tried, the page's Content-Security-Policy would refuse it
  assert.match(response.headers()["content-security-policy"], /default-src 'none'/);
  await page.waitForSelector("#me b");
  const py = python(server);
  await py.waitFor((m) => m.action === "login");
  await say(page, "hello, offline world");
  py.say("https://example.org/picture.png <img src=https://example.org/x.png>");
  await waitText(page, "hello, offline world");
  await waitText(page, "https://example.org/picture.png <img src=https://example.org/x.png>");
  await page.reload();  // with history this time
  await page.waitForSelector("#messages .divider");
  await page.screenshot({ path: path.join(artifacts, "page-offline.png") });  // fonts, too
  assert.deepEqual(outside, []);
  assert.deepEqual(await page.evaluate(() => window.refused), []);
  py.quit();
  await context.close();
  await server.stop();
});
