-- wrk script: append one ~150-byte JSON message per request to a stream picked at random
-- among BENCH_STREAMS (1000) streams named BENCH_PREFIX/0 .. BENCH_PREFIX/N-1 (created first).
--   BENCH_PREFIX=/bench/many BENCH_STREAMS=1000 wrk -t2 -c64 -d10s -s bench/wrk/append_many.lua http://127.0.0.1:PORT
local prefix = os.getenv("BENCH_PREFIX") or "/bench/many"
local streams = tonumber(os.getenv("BENCH_STREAMS") or "1000")
local next_id = 1
function setup(thread)
  thread:set("id", next_id)
  next_id = next_id + 1
end
function init(args)
  math.randomseed(os.time() * 1000 + (id or 0) * 7919)
end
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"type":"event","id":"evt-000000001","ts":"2026-01-01T00:00:00.000Z",'
  .. '"user":"alice","action":"click","target":"button#submit","value":42,"tags":["a","b"]}'
function request()
  return wrk.format(nil, prefix .. "/" .. math.random(0, streams - 1))
end
