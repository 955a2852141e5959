// Reads an opencode event stream through @opencode-ai/sdk's own client (its
// SSE reader and JSON parsing) and prints the first COUNT events it yields,
// as one JSON array. Exits 3 if they do not come within 10 s.
//
//   node opencode_sdk.mjs SDK_DIR BASE_URL COUNT
import path from "node:path"
import { pathToFileURL } from "node:url"

const [sdkDir, baseUrl, count] = process.argv.slice(2)
const timer = setTimeout(() => {
  console.error("no events in 10 s")
  process.exit(3)
}, 10000)
const entry = path.join(sdkDir, "node_modules/@opencode-ai/sdk/dist/v2/client.js")
const { createOpencodeClient } = await import(pathToFileURL(entry).href)
const client = createOpencodeClient({ baseUrl })
const controller = new AbortController()
const result = await client.event.subscribe({}, { signal: controller.signal, sseMaxRetryAttempts: 1 })
const events = []
for await (const event of result.stream) {
  events.push(event)
  if (events.length >= Number(count)) break
}
controller.abort()
clearTimeout(timer)
process.stdout.write(JSON.stringify(events))
process.exit(0)
