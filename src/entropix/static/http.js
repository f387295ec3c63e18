// What the playground and the chat app both need of the server's answers: the events of an
// OpenAI-style stream (server-sent events), and the one-line text of an error answer.
"use strict";

// The JSON events of a streamed completion, until [DONE] or the end of the body.
async function* sseEvents(res) {
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      yield JSON.parse(data);
    }
  }
}

// "status: message" from an OpenAI-shaped error body, else the HTTP status line.
async function errorText(res) {
  try {
    const body = await res.json();
    if (body && body.error) return `${res.status}: ${body.error.message}`;
  } catch (_) { /* not JSON */ }
  return `${res.status} ${res.statusText}`;
}
