// Starts the real chatroom binary ($CHATROOM, else ./chatroom) on a free loopback port.
import { spawn } from "node:child_process";
import { createServer, connect } from "node:net";
import { fileURLToPath } from "node:url";
import path from "node:path";

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..", "..");
export const BINARY = process.env.CHATROOM || path.join(root, "chatroom");

function freePort() {
  return new Promise((resolve) => {
    const s = createServer();
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

function accepting(port) {
  return new Promise((resolve) => {
    const c = connect(port, "127.0.0.1");
    c.on("connect", () => { c.destroy(); resolve(true); });
    c.on("error", () => resolve(false));
  });
}

// Servers still running: a test that fails half-way leaves its own, and the file's after()
// hook stops them with killAll(), or node --test would wait for them for ever.
const live = new Set();

export function killAll() {
  for (const proc of live) proc.kill("SIGKILL");
  live.clear();
}

export async function startServer(...args) {
  const i = args.indexOf("--port");
  const port = i >= 0 ? Number(args.splice(i, 2)[1]) : await freePort();
  const proc = spawn(BINARY, ["--host", "127.0.0.1", "--port", String(port), ...args], {
    stdio: ["ignore", "pipe", "pipe"],
  });
  let stdout = "", stderr = "";
  proc.stdout.on("data", (d) => (stdout += d));
  proc.stderr.on("data", (d) => (stderr += d));
  live.add(proc);
  const exited = new Promise((resolve) => proc.on("exit", (code) => { live.delete(proc); resolve(code); }));
  for (let i = 0; i < 200 && !(await accepting(port)); i++)
    await new Promise((r) => setTimeout(r, 25));
  return {
    url: `http://127.0.0.1:${port}`,
    port,
    output: () => stdout,
    async stop() {
      proc.kill("SIGTERM");
      const code = await exited;
      if (code !== 0 || /Sanitizer|runtime error:/.test(stderr))
        throw new Error(`chatroom exited ${code}: ${stderr}`);
    },
  };
}

// Collects a client's "msg" events; wait(pred) resolves with the first that matches.
export function recorder(socket) {
  const msgs = [];
  const waiters = [];
  socket.on("msg", (data) => {
    msgs.push(data);
    for (const w of [...waiters]) {
      if (w.pred(data)) {
        waiters.splice(waiters.indexOf(w), 1);
        w.resolve(data);
      }
    }
  });
  return {
    msgs,
    wait(pred, ms = 5000) {
      const found = msgs.find(pred);
      if (found) return Promise.resolve(found);
      return new Promise((resolve, reject) => {
        const w = { pred, resolve };
        waiters.push(w);
        setTimeout(() => reject(new Error(`no matching msg in ${ms} ms; last: ${JSON.stringify(msgs.slice(-3))}`)), ms).unref();
      });
    },
  };
}
