-- wrk script: append one ~150-byte JSON message per request to a JSON stream.
--   wrk -t2 -c32 -d10s -s bench/wrk/append.lua http://127.0.0.1:PORT/bench/append
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"type":"event","id":"evt-000000001","ts":"2026-01-01T00:00:00.000Z",'
  .. '"user":"alice","action":"click","target":"button#submit","value":42,"tags":["a","b"]}'
