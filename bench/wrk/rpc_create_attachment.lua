-- wrk script: task.create_attachment with a small JSON value, upserting one of
-- 1000 keys of one task (the analogue of redis-benchmark's HSET on one hash).
--   TASK=t-... wrk -t2 -c32 -d10s -s bench/wrk/rpc_create_attachment.lua http://127.0.0.1:PORT/rpc
local task = os.getenv("TASK") or "t-bench"
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local counter = 0
request = function()
  counter = counter + 1
  local body = '{"jsonrpc":"2.0","method":"task.create_attachment","params":{"taskId":"' .. task
    .. '","key":"k' .. math.random(0, 999) .. '","type":"json","value":{"n":' .. counter
    .. ',"ok":true}},"id":' .. counter .. '}'
  return wrk.format(nil, nil, nil, body)
end
response = function(status, headers, body)
  if status ~= 200 or not string.find(body, '"result"', 1, true) then
    wrk.thread:stop()
    io.stderr:write("unexpected answer: " .. status .. " " .. body .. "\n")
  end
end
