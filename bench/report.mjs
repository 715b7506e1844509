#!/usr/bin/env node
// Turns bench/run.sh's results (JSON lines {server, metric, value}) into a table with ratios,
// prints it, and writes the Markdown report.
//   node report.mjs results.jsonl meta.json results-latest.md
import { readFileSync, writeFileSync } from "node:fs"

const [resultsPath, metaPath, outPath] = process.argv.slice(2)
const meta = JSON.parse(readFileSync(metaPath, `utf8`))
const data = {}
for (const line of readFileSync(resultsPath, `utf8`).split(`\n`)) {
  if (!line.trim()) continue
  const { server, metric, value } = JSON.parse(line)
  ;(data[server] ??= {})[metric] = value
}
// VmHWM is maintained lazily by the kernel; never report a peak below a sampled VmRSS.
for (const d of Object.values(data)) {
  const peaks = [d.peak_rss_kb, d.fanout_rss_wait_kb_max, d.idle_rss_kb].filter((v) => v != null)
  if (peaks.length) d.peak_rss_kb = Math.max(...peaks)
}
const order = [`attache`, `attache-nofsync`, `node-mem`, `node-file`]
const servers = order.filter((s) => data[s]).concat(Object.keys(data).filter((s) => !order.includes(s)))

const kb2mib = (v) => (v == null ? null : v / 1024)
// [label, metric, transform, decimals, better: "higher" | "lower" | null]
const rows = [
  [`Idle RSS after start (MiB)`, `idle_rss_kb`, kb2mib, 1, `lower`],
  [`(a) Appends/s (POST ~150 B JSON)`, `append_rps`, null, 0, `higher`],
  [`(a) Append latency p50 (ms)`, `append_p50_ms`, null, 2, `lower`],
  [`(a) Append latency p99 (ms)`, `append_p99_ms`, null, 2, `lower`],
  [`(a) Append errors (non-2xx + socket)`, `append_errors`, null, 0, null],
  [`(b) Catch-up reads/s (offset=-1)`, `catchup_rps`, null, 0, `higher`],
  [`(b) Catch-up latency p50 (ms)`, `catchup_p50_ms`, null, 2, `lower`],
  [`(b) Catch-up latency p99 (ms)`, `catchup_p99_ms`, null, 2, `lower`],
  [`(b) Messages in the offset=-1 response`, `catchup_messages`, null, 0, null],
  [`(b) Bytes per catch-up response`, `catchup_bytes`, null, 0, null],
  [`(b) Catch-up errors`, `catchup_errors`, null, 0, null],
  [`(b) Mid-offset reads/s`, `catchup_mid_rps`, null, 0, `higher`],
  [`(b) Mid-offset latency p50 (ms)`, `catchup_mid_p50_ms`, null, 2, `lower`],
  [`(b) Bytes per mid-offset response`, `catchup_mid_bytes`, null, 0, null],
  [`(c) Fan-out append→receipt p50 (ms)`, `fanout_p50_ms`, null, 2, `lower`],
  [`(c) Fan-out append→receipt p99 (ms)`, `fanout_p99_ms`, null, 2, `lower`],
  [`(c) Fan-out append→receipt max (ms)`, `fanout_max_ms`, null, 2, `lower`],
  [`(c) Fan-out readers missed (non-200)`, `fanout_misses`, null, 0, null],
  [`(c) RSS with all readers waiting (MiB)`, `fanout_rss_wait_kb_max`, kb2mib, 1, `lower`],
  [`(c) RSS added by the waiting readers (MiB)`, `fanout_rss_readers_delta_kb`, kb2mib, 1, `lower`],
  [`Peak RSS over the run (MiB)`, `peak_rss_kb`, kb2mib, 1, `lower`],
  [`Other CPU load before start (% busy)`, `other_cpu_busy_pct`, null, 0, null],
]

const ratioPairs = [
  [`attache`, `node-mem`],
  [`attache`, `node-file`],
  [`attache-nofsync`, `node-mem`],
].filter(([a, b]) => data[a] && data[b])

const val = (server, metric, tf) => {
  const v = data[server]?.[metric]
  if (v == null || Number.isNaN(Number(v))) return null
  return tf ? tf(Number(v)) : Number(v)
}
const fmt = (v, d) =>
  v == null ? `—` : Number(v).toLocaleString(`en-US`, { minimumFractionDigits: d, maximumFractionDigits: d })

const header = [`Metric`, ...servers, ...ratioPairs.map(([a, b]) => `${a} ÷ ${b}`)]
const table = [header]
for (const [label, metric, tf, d, better] of rows) {
  if (!servers.some((s) => val(s, metric, tf) != null)) continue
  const cells = servers.map((s) => fmt(val(s, metric, tf), d))
  const ratios = ratioPairs.map(([a, b]) => {
    if (!better) return ``
    const x = val(a, metric, tf)
    const y = val(b, metric, tf)
    if (x == null || y == null || x <= 0 || y <= 0) return `—`
    return `${(x / y).toFixed(2)}×`
  })
  table.push([label, ...cells, ...ratios])
}
if (servers.some((s) => data[s]?.fanout_failed)) {
  table.push([`(c) Fan-out run failed`, ...servers.map((s) => (data[s]?.fanout_failed ? `FAILED` : ``)), ...ratioPairs.map(() => ``)])
}

const widths = header.map((_, i) => Math.max(...table.map((r) => String(r[i]).length)))
const line = (r) => `| ` + r.map((c, i) => (i === 0 ? String(c).padEnd(widths[i]) : String(c).padStart(widths[i]))).join(` | `) + ` |`
const sep = `|` + widths.map((w, i) => (i === 0 ? `-`.repeat(w + 1) + `-` : `-`.repeat(w + 1) + `:`)).join(`|`) + `|`
const md = [line(table[0]), sep, ...table.slice(1).map(line)].join(`\n`)
console.log(md)

const notes = `
Servers: \`attache\` = \`attache serve\` (default: fsync before acknowledging writes);
\`attache-nofsync\` = same with \`--no-fsync\`; \`node-mem\` = Node reference
(\`@durable-streams/server@0.3.7\`) in memory; \`node-file\` = Node reference file-backed
(\`dataDir\`, LMDB + logs, fdatasync per append). Each server runs alone, fresh data dir,
on 127.0.0.1; long-poll timeout 30 s.

Ratios are attache ÷ peer: above 1× is better for throughput rows, below 1× is better for
latency and memory rows. The load generator (wrk, the fan-out tool) shares the machine's
cores with the server under test. "Other CPU load before start" is the machine's CPU use
in the 2 s before each server starts (nothing of the benchmark runs then); well above 0%
means something else (e.g. a cargo build) was running and that column is disturbed: rerun
when the machine is idle.
`
const report = `# Benchmark results (latest run)

- Date: ${meta.date}; git ${meta.gitRev}
- Machine: ${meta.cpus} × ${meta.cpuModel}, ${meta.memGiB} GiB RAM, Linux ${meta.kernel}, Node ${meta.node}
- Load: ${meta.params}
- Reproduce: \`bench/run.sh\` (see bench/README.md)

${md}
${notes}`
writeFileSync(outPath, report)
