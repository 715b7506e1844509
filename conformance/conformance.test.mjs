// Durable Streams server conformance suite, run against the server at $ATTACHE_URL.
//
//   ATTACHE_URL=http://127.0.0.1:4437 npx vitest run
//
// Optional env:
//   CONFORMANCE_LONG_POLL_TIMEOUT_MS  basis for long-poll test timeouts (suite default 20000;
//                                     the per-test timeout is this + 1000 ms)
//   CONFORMANCE_SUBSCRIPTIONS=1       also run the (opt-in) reserved subscription API tests
import { runConformanceTests } from "@durable-streams/server-conformance-tests"

const baseUrl = process.env.ATTACHE_URL
if (!baseUrl) {
  throw new Error(`ATTACHE_URL is required (e.g. http://127.0.0.1:4437); see conformance/run.sh`)
}

const options = { baseUrl: baseUrl.replace(/\/+$/, ``) }
if (process.env.CONFORMANCE_LONG_POLL_TIMEOUT_MS) {
  options.longPollTimeoutMs = Number(process.env.CONFORMANCE_LONG_POLL_TIMEOUT_MS)
}
if (process.env.CONFORMANCE_SUBSCRIPTIONS === `1`) {
  options.subscriptions = true
}

runConformanceTests(options)
