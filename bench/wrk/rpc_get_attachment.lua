-- wrk script: task.get_attachment of one existing key (the analogue of redis-benchmark's GET).
--   TASK=t-... wrk -t2 -c32 -d10s -s bench/wrk/rpc_get_attachment.lua http://127.0.0.1:PORT/rpc
local task = os.getenv("TASK") or "t-bench"
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"jsonrpc":"2.0","method":"task.get_attachment","params":{"taskId":"' .. task
  .. '","key":"k1"},"id":1}'
response = function(status, headers, body)
  if status ~= 200 or not string.find(body, '"result"', 1, true) then
    wrk.thread:stop()
    io.stderr:write("unexpected answer: " .. status .. " " .. body .. "\n")
  end
end
