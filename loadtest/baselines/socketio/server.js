// The stack most teams would pick instead of Chorus, as `make bench`'s second baseline (issue 15):
// Node.js Socket.IO with its Redis adapter over node-redis pub/sub, one process per replica.
//
//   CHORUS_REDIS_URL=redis://127.0.0.1:6379 node server.js --port 8001
//
// Stock settings except where the bench needs the three stacks alike: websocket transport only
// (no long-polling upgrade dance), no per-message deflate (Chorus and naive run without it).
// A client joins the room named in its handshake query (`?room=R&user=U`); each `message` event
// goes to the room except its sender, with the fields the naive baseline adds (id, ts, room,
// user, replica), and the sender gets an ack, as Chorus and naive ack theirs.
"use strict";

const http = require("node:http");
const { Server } = require("socket.io");
const { createAdapter } = require("@socket.io/redis-adapter");
const { createClient } = require("redis");

const REPLICA = process.env.CHORUS_REPLICA_NAME || "socketio";
const REDIS_URL = process.env.CHORUS_REDIS_URL || "redis://127.0.0.1:6379";
const portAt = process.argv.indexOf("--port");
const PORT = portAt > 0 ? Number(process.argv[portAt + 1]) : 8000;
const READY_CHANNEL = "chorus-bench:ready";

let ready = false;
let ids = 0;

const httpServer = http.createServer((req, res) => {
  // Socket.IO answers /socket.io/ itself; everything else is the harness's readiness probe.
  const status = req.url === "/readyz" && ready ? 200 : 503;
  res.writeHead(status, { "content-type": "application/json" });
  res.end(JSON.stringify({ status: status === 200 ? "ready" : "starting", replica: REPLICA }));
});

async function main() {
  const pubClient = createClient({ url: REDIS_URL });
  const subClient = pubClient.duplicate();
  for (const client of [pubClient, subClient]) {
    client.on("error", (err) => console.error(`${REPLICA}: redis: ${err.message}`));
  }
  await Promise.all([pubClient.connect(), subClient.connect()]);

  const io = new Server(httpServer, {
    transports: ["websocket"],
    perMessageDeflate: false,
    httpCompression: false,
    serveClient: false,
    // Chorus caps a frame at 64 KiB; Socket.IO's default (1 MB) would let a client buffer more.
    maxHttpBufferSize: 64 * 1024,
    adapter: createAdapter(pubClient, subClient),
  });

  io.on("connection", (socket) => {
    const { room, user } = socket.handshake.query;
    if (typeof room !== "string" || room === "") {
      socket.disconnect(true);
      return;
    }
    const name = typeof user === "string" ? user : "anon";
    // Local only: the adapter listens on one pattern per namespace, so a join costs no Redis
    // round trip and the room is live when the client reads the CONNECT reply.
    socket.join(room);
    socket.on("message", (body, ack) => {
      if (body === null || typeof body !== "object" || typeof body.text !== "string") {
        return;
      }
      const id = `${REPLICA}-${ids++}`;
      socket.to(room).emit("message", {
        type: "message",
        id,
        ts: Date.now() / 1000,
        room,
        user: name,
        text: body.text,
        replica: REPLICA,
      });
      if (typeof ack === "function") {
        ack({ type: "ack", id });
      }
    });
  });

  // The adapter's PSUBSCRIBE is not awaitable; a SUBSCRIBE sent after it on the same connection
  // is answered after it, so once this resolves, broadcasts from other replicas reach us.
  const probe = () => {};
  await subClient.subscribe(READY_CHANNEL, probe);
  await subClient.unsubscribe(READY_CHANNEL, probe);

  httpServer.listen(PORT, "127.0.0.1", () => {
    ready = true;
  });
}

main().catch((err) => {
  console.error(`${REPLICA}: ${err.stack || err}`);
  process.exit(1);
});
