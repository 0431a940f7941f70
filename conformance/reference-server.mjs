// The Node reference server (@durable-streams/server), in memory, for side-by-side runs:
//   node reference-server.mjs PORT   → prints "listening http://127.0.0.1:PORT" once ready
import { DurableStreamTestServer } from "@durable-streams/server"

const port = Number(process.argv[2] ?? 4437)
const server = new DurableStreamTestServer({ port, host: "127.0.0.1" })
await server.start()
console.log(`listening http://127.0.0.1:${port}`)
const stop = async () => {
  await server.stop()
  process.exit(0)
}
process.on("SIGTERM", stop)
process.on("SIGINT", stop)
