// A socket.io-client 4 client on long-polling only, driven by a test over stdin/stdout:
// it prints each msg event as a JSON line with its arrival time (Date.now()), and obeys
// "say TEXT" lines by emitting {"msg": TEXT, "sent": Date.now()}.
import { createInterface } from "node:readline";
import { io } from "socket.io-client";

const socket = io(process.argv[2], { transports: ["polling"], reconnection: false });
socket.on("msg", (data) => console.log(JSON.stringify({ at: Date.now(), data })));
socket.on("disconnect", (reason) => console.log(JSON.stringify({ at: Date.now(), disconnect: reason })));
socket.on("connect_error", (e) => console.log(JSON.stringify({ error: String(e) })));
createInterface({ input: process.stdin }).on("line", (line) => {
  const [cmd, ...rest] = line.split(" ");
  if (cmd === "say") socket.emit("msg", { action: "send msg", msg: rest.join(" "), sent: Date.now() });
  if (cmd === "quit") { socket.disconnect(); process.exit(0); }
});
