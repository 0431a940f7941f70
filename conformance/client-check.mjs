// The official JS client (@durable-streams/client) against fanline, for tests/streams/test_streams.py:
//   DS_URL=<stream URL on one pod> DS_URL_2=<the same stream on another pod> [GEN_URL=<a generation stream>]
//   node client-check.mjs   → prints one JSON line: what it read
import { DurableStream, stream } from "@durable-streams/client"

const url = process.env.DS_URL
const url2 = process.env.DS_URL_2 ?? url
const headers = process.env.DS_KEY ? { Authorization: `Bearer ${process.env.DS_KEY}` } : undefined

const handle = await DurableStream.create({ url, contentType: "application/json", headers })
await handle.append(JSON.stringify({ n: 1 }))
await handle.append(JSON.stringify({ n: 2 }))
await handle.append(JSON.stringify({ n: 3 }))

const first = await stream({ url: url2, offset: "-1", live: false, headers })
const items = await first.json()
const resumed = await stream({ url: url2, offset: first.offset, live: false, headers })
const after = await resumed.json()

const out = { items, offset: first.offset, after }
if (process.env.GEN_URL) {
  const gen = await stream({ url: process.env.GEN_URL, offset: "-1", live: "long-poll", headers })
  const chunks = []
  for await (const chunk of gen.jsonStream()) chunks.push(chunk)
  out.chunks = chunks
}
console.log(JSON.stringify(out))
