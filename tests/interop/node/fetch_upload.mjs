// One file upload with Node's own fetch (undici), as @verdant-web/store uploads files: a
// multipart FormData POST to {sync}/files/{id}. Used by tests/test_refusals.py.
//
// Run:  node fetch_upload.mjs <url> <token> <file bytes>
// Prints one JSON line: {"status": 413, "body": "..."} when an answer arrived, or
// {"error": "...", "code": "EPIPE"} when fetch failed without one.
const [url, token, bytes] = process.argv.slice(2);
const form = new FormData();
form.append('file', new Blob([new Uint8Array(Number(bytes))]), 'big.bin');
try {
  const response = await fetch(url, {
    method: 'POST',
    body: form,
    headers: { Authorization: `Bearer ${token}` },
  });
  console.log(JSON.stringify({ status: response.status, body: await response.text() }));
} catch (error) {
  const cause = error.cause ?? {};
  console.log(JSON.stringify({ error: String(cause.message ?? error), code: cause.code ?? null }));
}
