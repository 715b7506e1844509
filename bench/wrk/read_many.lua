-- wrk script: a whole-stream catch-up read (GET ?offset=-1) of a stream picked at random
-- among BENCH_STREAMS (1000) streams named BENCH_PREFIX/0 .. BENCH_PREFIX/N-1 (filled first).
--   BENCH_PREFIX=/bench/cu BENCH_STREAMS=1000 wrk -t2 -c32 -d10s -s bench/wrk/read_many.lua http://127.0.0.1:PORT
local prefix = os.getenv("BENCH_PREFIX") or "/bench/cu"
local streams = tonumber(os.getenv("BENCH_STREAMS") or "1000")
local next_id = 1
function setup(thread)
  thread:set("id", next_id)
  next_id = next_id + 1
end
function init(args)
  math.randomseed(os.time() * 1000 + (id or 0) * 7919)
end
function request()
  return wrk.format("GET", prefix .. "/" .. math.random(0, streams - 1) .. "?offset=-1")
end
