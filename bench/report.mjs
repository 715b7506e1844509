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
  const peaks = [d.peak_rss_kb, d.fanout_rss_wait_kb_max, d.sse_rss_wait_kb_max, d.idle_rss_kb, d.rss_after_wrk_kb, d.rss_after_load_kb].filter(
    (v) => v != null,
  )
  if (peaks.length) d.peak_rss_kb = Math.max(...peaks)
}
const order = [`attache`, `ds-rust`, `attache-nofsync`, `node-mem`, `node-file`]
const servers = order.filter((s) => data[s]).concat(Object.keys(data).filter((s) => !order.includes(s)))

const many = Number(meta.manyStreams ?? 1000).toLocaleString(`en-US`)
const sseN = Number(meta.sseReaders ?? 1000).toLocaleString(`en-US`)
const fanN = Number(meta.fanoutReaders ?? 1000).toLocaleString(`en-US`)
const bigMiB = +(Number(meta.bigBytes ?? 1048576) / 1048576).toFixed(2)
const kb2mib = (v) => (v == null ? null : v / 1024)
const b2mib = (v) => (v == null ? null : v / 1048576)
// [label, metric, transform, decimals, better: "higher" | "lower" | null]
const rows = [
  [`Idle RSS after start (MiB)`, `idle_rss_kb`, kb2mib, 1, `lower`],
  [`Idle anonymous memory (MiB; RSS less mapped code)`, `idle_anon_kb`, kb2mib, 1, `lower`],
  [`(a) Appends/s (POST ~150 B JSON)`, `append_rps`, null, 0, `higher`],
  [`(a) Append latency p50 (ms)`, `append_p50_ms`, null, 2, `lower`],
  [`(a) Append latency p99 (ms)`, `append_p99_ms`, null, 2, `lower`],
  [`(a) Append errors (non-2xx + socket)`, `append_errors`, null, 0, null],
  [`(a2) Appends/s over ${many} streams (random stream per POST)`, `many_append_rps`, null, 0, `higher`],
  [`(a2) Append latency p50 (ms)`, `many_append_p50_ms`, null, 2, `lower`],
  [`(a2) Append latency p99 (ms)`, `many_append_p99_ms`, null, 2, `lower`],
  [`(a2) Append errors`, `many_append_errors`, null, 0, null],
  [`(b) Catch-up reads/s (offset=-1)`, `catchup_rps`, null, 0, `higher`],
  [`(b) Catch-up latency p50 (ms)`, `catchup_p50_ms`, null, 2, `lower`],
  [`(b) Catch-up latency p99 (ms)`, `catchup_p99_ms`, null, 2, `lower`],
  [`(b) Messages in the offset=-1 response`, `catchup_messages`, null, 0, null],
  [`(b) Bytes per catch-up response`, `catchup_bytes`, null, 0, null],
  [`(b) Catch-up errors`, `catchup_errors`, null, 0, null],
  [`(b) Mid-offset reads/s`, `catchup_mid_rps`, null, 0, `higher`],
  [`(b) Mid-offset latency p50 (ms)`, `catchup_mid_p50_ms`, null, 2, `lower`],
  [`(b) Bytes per mid-offset response`, `catchup_mid_bytes`, null, 0, null],
  [`(b2) Catch-up of ${many} streams: MiB/s (offset=-1, random stream)`, `cu_bps`, b2mib, 1, `higher`],
  [`(b2) Catch-up reads/s`, `cu_rps`, null, 0, `higher`],
  [`(b2) Catch-up latency p99 (ms)`, `cu_p99_ms`, null, 2, `lower`],
  [`(b2) Messages per stream in one offset=-1 read`, `cu_messages`, null, 0, null],
  [`(b2) Bytes per response`, `cu_bytes`, null, 0, null],
  [`(b2) Errors`, `cu_errors`, null, 0, null],
  [`(b3) ${bigMiB} MiB stream read whole: MiB/s (offset=-1)`, `big_bps`, b2mib, 1, `higher`],
  [`(b3) ${bigMiB} MiB reads/s`, `big_rps`, null, 1, `higher`],
  [`(b3) ${bigMiB} MiB read latency p99 (ms)`, `big_p99_ms`, null, 2, `lower`],
  [`(b3) Body bytes of one offset=-1 GET`, `big_first_get_bytes`, null, 0, null],
  [`(b3) Bytes per response (with head)`, `big_bytes`, null, 0, null],
  [`(b3) Errors`, `big_errors`, null, 0, null],
  [`RSS after the wrk loads (MiB)`, `rss_after_wrk_kb`, kb2mib, 1, `lower`],
  [`Anonymous memory after the wrk loads (MiB)`, `anon_after_wrk_kb`, kb2mib, 1, `lower`],
  [`(c) Long-poll fan-out, ${fanN} readers: append→receipt p50 (ms)`, `fanout_p50_ms`, null, 2, `lower`],
  [`(c) Fan-out append→receipt p99 (ms)`, `fanout_p99_ms`, null, 2, `lower`],
  [`(c) Fan-out append→receipt max (ms)`, `fanout_max_ms`, null, 2, `lower`],
  [`(c) Fan-out readers missed (non-200)`, `fanout_misses`, null, 0, null],
  [`(c) RSS with all readers waiting (MiB)`, `fanout_rss_wait_kb_max`, kb2mib, 1, `lower`],
  [`(c) RSS added by the waiting readers (MiB)`, `fanout_rss_readers_delta_kb`, kb2mib, 1, `lower`],
  [`(d) SSE fan-out, ${sseN} subscribers: append→receipt p50 (ms)`, `sse_p50_ms`, null, 2, `lower`],
  [`(d) SSE fan-out append→receipt p99 (ms)`, `sse_p99_ms`, null, 2, `lower`],
  [`(d) SSE fan-out append→receipt max (ms)`, `sse_max_ms`, null, 2, `lower`],
  [`(d) SSE receipts missed`, `sse_misses`, null, 0, null],
  [`(d) SSE reconnects (server ended a response)`, `sse_reconnects`, null, 0, null],
  [`(d) RSS with the SSE subscribers connected (MiB)`, `sse_rss_wait_kb_max`, kb2mib, 1, `lower`],
  [`(d) RSS added by the SSE subscribers (MiB)`, `sse_rss_readers_delta_kb`, kb2mib, 1, `lower`],
  [`(d) Anonymous memory with the SSE subscribers, most sampled (MiB)`, `sse_anon_kb_max`, kb2mib, 1, `lower`],
  [`RSS after the load, clients gone (MiB)`, `rss_after_load_kb`, kb2mib, 1, `lower`],
  [`Anonymous memory after the load, clients gone (MiB)`, `anon_after_load_kb`, kb2mib, 1, `lower`],
  [`Peak RSS over the run (MiB)`, `peak_rss_kb`, kb2mib, 1, `lower`],
  [`Other CPU load before start (% busy)`, `other_cpu_busy_pct`, null, 0, null],
]

const ratioPairs = [
  [`attache`, `ds-rust`],
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
for (const [metric, label] of [[`fanout_failed`, `(c) Fan-out run failed`], [`sse_failed`, `(d) SSE fan-out run failed`]]) {
  if (servers.some((s) => data[s]?.[metric])) {
    table.push([label, ...servers.map((s) => (data[s]?.[metric] ? `FAILED` : ``)), ...ratioPairs.map(() => ``)])
  }
}

const widths = header.map((_, i) => Math.max(...table.map((r) => String(r[i]).length)))
const line = (r) => `| ` + r.map((c, i) => (i === 0 ? String(c).padEnd(widths[i]) : String(c).padStart(widths[i]))).join(` | `) + ` |`
const sep = `|` + widths.map((w, i) => (i === 0 ? `-`.repeat(w + 1) + `-` : `-`.repeat(w + 1) + `:`)).join(`|`) + `|`
const md = [line(table[0]), sep, ...table.slice(1).map(line)].join(`\n`)
console.log(md)

// Issue 11's targets, attache against Electric's Rust server in this run.
let targets = ``
if (data.attache && data[`ds-rust`]) {
  const a = (m) => val(`attache`, m)
  const r = (m) => val(`ds-rust`, m)
  const ratio = (m) => (a(m) > 0 && r(m) > 0 ? a(m) / r(m) : null)
  const mib = (v) => (v == null ? `—` : `${(v / 1024).toFixed(1)} MiB`)
  const verdict = (ok) => (ok == null ? `—` : ok ? `met` : `**not met**`)
  const tRows = [
    [`appends to one stream (/s)`, fmt(a(`append_rps`), 0), fmt(r(`append_rps`), 0), ratio(`append_rps`), `≥ 1.2×`, (x) => x >= 1.2],
    [`appends over ${many} streams (/s)`, fmt(a(`many_append_rps`), 0), fmt(r(`many_append_rps`), 0), ratio(`many_append_rps`), `≥ 1.2×`, (x) => x >= 1.2],
    [`catch-up of ${many} streams (MiB/s)`, fmt(b2mib(a(`cu_bps`)), 1), fmt(b2mib(r(`cu_bps`)), 1), ratio(`cu_bps`), `≥ 1.2×`, (x) => x >= 1.2],
    [`${bigMiB} MiB reads (MiB/s)`, fmt(b2mib(a(`big_bps`)), 1), fmt(b2mib(r(`big_bps`)), 1), ratio(`big_bps`), `≥ 1.0×`, (x) => x >= 1.0],
    [`SSE delivery p99, ${sseN} subscribers (ms)`, fmt(a(`sse_p99_ms`), 2), fmt(r(`sse_p99_ms`), 2), ratio(`sse_p99_ms`), `≤ 1.0×`, (x) => x <= 1.0],
    [`RSS with the SSE subscribers`, mib(a(`sse_rss_wait_kb_max`)), mib(r(`sse_rss_wait_kb_max`)), ratio(`sse_rss_wait_kb_max`), `≤ 1.0×`, (x) => x <= 1.0],
    [`(context) anonymous memory with the SSE subscribers`, mib(a(`sse_anon_kb_max`)), mib(r(`sse_anon_kb_max`)), ratio(`sse_anon_kb_max`), `RSS less mapped code`, null, null],
    [`append p99, one stream (ms)`, fmt(a(`append_p99_ms`), 2), fmt(r(`append_p99_ms`), 2), ratio(`append_p99_ms`), `≤ 1.0×`, (x) => x <= 1.0],
    [`RSS after the load`, mib(a(`rss_after_load_kb`)), mib(r(`rss_after_load_kb`)), ratio(`rss_after_load_kb`), `attache ≤ 32 MiB`, null, a(`rss_after_load_kb`) == null ? null : a(`rss_after_load_kb`) <= 32 * 1024],
    [`idle RSS after start`, mib(a(`idle_rss_kb`)), mib(r(`idle_rss_kb`)), ratio(`idle_rss_kb`), `attache ≤ 16 MiB`, null, a(`idle_rss_kb`) == null ? null : a(`idle_rss_kb`) <= 16 * 1024],
  ]
  const lines = [`| work | attache | ds-rust | attache ÷ ds-rust | target | |`, `|---|--:|--:|--:|---|---|`]
  for (const [label, x, y, q, target, test, direct] of tRows) {
    const ok = test ? (q == null ? null : test(q)) : direct
    lines.push(`| ${label} | ${x} | ${y} | ${q == null ? `—` : `${q.toFixed(2)}×`} | ${target} | ${verdict(ok)} |`)
  }
  targets = `\n## Issue 11 targets: attache vs Electric's Rust server, this run\n\n${lines.join(`\n`)}\n`
  console.log(targets)
}

const notes = `
Servers: \`attache\` = \`attache serve\` (default: fsync before acknowledging writes);
\`ds-rust\` = Electric's Rust Durable Streams server (crate \`durable-streams\`,
\`durable-streams-server --port P --data-dir D\`, its default durable \`wal\` mode: an append is
acknowledged after a group-commit fdatasync);
\`attache-nofsync\` = \`attache serve --no-fsync\`; \`node-mem\` = Node reference
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

- Date: ${meta.date}; checkout at git ${meta.gitRev}
- attache: ${meta.attache ?? `—`}${meta.dsRust ? `\n- Rust peer: ${meta.dsRust}` : ``}
- Machine: ${meta.cpus} × ${meta.cpuModel}, ${meta.memGiB} GiB RAM, Linux ${meta.kernel}, Node ${meta.node}
- Load: ${meta.params}
- Reproduce: \`${meta.command ?? `bench/run.sh`}\` (see bench/README.md)
${targets}
## All figures

${md}
${notes}`
writeFileSync(outPath, report)
