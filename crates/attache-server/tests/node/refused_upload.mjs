// Uploads as Electric's UI does (Node's fetch, a FormData body, the file part
// first) and prints what the client saw, one JSON line per attempt:
// node refused_upload.mjs URL PRINCIPAL BYTES  ->  {"status":403,"body":{...}} or {"error":"..."}
const [url, principal, bytes] = process.argv.slice(2);
const form = new FormData();
form.set("file", new Blob([new Uint8Array(Number(bytes))]), "big.bin");
form.set("subject", JSON.stringify({ type: "context", key: "k" }));
try {
  const res = await fetch(url, { method: "POST", body: form, headers: { "electric-principal": principal } });
  const text = await res.text();
  let body;
  try { body = JSON.parse(text); } catch { body = text; }
  console.log(JSON.stringify({ status: res.status, body }));
} catch (e) {
  console.log(JSON.stringify({ error: `${e.message}: ${e.cause?.code ?? e.cause?.message ?? ""}` }));
}
