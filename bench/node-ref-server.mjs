#!/usr/bin/env node
// Start the Durable Streams Node reference server (@durable-streams/server).
//
// Usage:
//   node node-ref-server.mjs --port 4437 [--data-dir DIR] [--long-poll-timeout-ms 2000]
//                           [--no-compression] [--subscriptions]
//
// Without --data-dir the server runs in-memory; with it, file-backed (LMDB + logs).
// Prints "READY <baseUrl>" on stdout once listening. Stops on SIGTERM/SIGINT.
import { DurableStreamTestServer } from "@durable-streams/server"

function parseArgs(argv) {
  const opts = { port: 4437, host: `127.0.0.1`, dataDir: undefined, longPollTimeout: 2000, compression: true, webhooks: false }
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]
    const next = () => {
      const v = argv[++i]
      if (v === undefined) throw new Error(`missing value for ${a}`)
      return v
    }
    switch (a) {
      case `--port`: opts.port = Number(next()); break
      case `--host`: opts.host = next(); break
      case `--data-dir`: opts.dataDir = next(); break
      case `--long-poll-timeout-ms`: opts.longPollTimeout = Number(next()); break
      case `--no-compression`: opts.compression = false; break
      case `--webhooks`: opts.webhooks = true; break
      case `-h`: case `--help`:
        console.log(`usage: node node-ref-server.mjs --port N [--data-dir DIR] [--long-poll-timeout-ms MS] [--no-compression] [--webhooks]`)
        process.exit(0)
      default: throw new Error(`unknown argument: ${a}`)
    }
  }
  return opts
}

const opts = parseArgs(process.argv.slice(2))
const server = new DurableStreamTestServer(opts)
const url = await server.start()
console.log(`READY ${url} mode=${opts.dataDir ? `file:${opts.dataDir}` : `memory`}`)

let stopping = false
async function shutdown() {
  if (stopping) return
  stopping = true
  try { await server.stop() } catch {}
  process.exit(0)
}
process.on(`SIGTERM`, shutdown)
process.on(`SIGINT`, shutdown)
