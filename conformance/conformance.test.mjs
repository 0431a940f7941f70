// The official Durable Streams conformance suite, unchanged, against DS_BASE_URL
// (e.g. http://127.0.0.1:8000/v1/streams). Run by tests/streams/test_conformance.py:
//   DS_BASE_URL=... npx vitest run --config vitest.config.mjs --reporter=json
import { describe } from "vitest"
import { runConformanceTests } from "@durable-streams/server-conformance-tests"

const baseUrl = process.env.DS_BASE_URL
if (!baseUrl) throw new Error("set DS_BASE_URL to the server's streams base URL")

describe(`Durable Streams conformance: ${baseUrl}`, () => {
  runConformanceTests({ baseUrl })
})
