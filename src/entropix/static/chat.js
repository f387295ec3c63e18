// entropix chat: conversations over the OpenAI chat completions route, answers streamed as
// markdown, and what the sampler did on demand. Plain JavaScript, no libraries, no network but
// the serving origin. Model text only ever reaches the page as text nodes (markdown.js).
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "entropix.chat.apikey";  // sessionStorage: the key lives for this session only

const app = {
  data: ChatStore.load(),
  models: [],
  specs: {},            // sampler name -> catalogue entry (/v1/entropix/info sampler_specs)
  colour: localStorage.getItem("entropix.chat.colour") === "1",
  controller: null,     // the streaming request's AbortController
  live: null,           // {conv, msg, el, run} of the answer being streamed
  rendering: false,
};

function node(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function setStatus(text, kind = "") {
  $("status").textContent = text;
  $("status").className = `status ${kind || "muted"}`;
}

const current = () => ChatStore.find(app.data, app.data.current);
const persist = () => { if (!ChatStore.save(app.data)) setStatus("local storage is full: older answers may be lost", "error"); };

// -- the server -------------------------------------------------------------------------
function headers() {
  const h = { "Content-Type": "application/json" };
  const key = sessionStorage.getItem(KEY_STORE);
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

function askKey(message) {
  const dlg = $("keydialog");
  $("keyerror").hidden = !message;
  $("keyerror").textContent = message || "";
  $("apikey").value = "";
  return new Promise((resolve) => {
    $("keyform").onsubmit = () => {
      sessionStorage.setItem(KEY_STORE, $("apikey").value.trim());
      resolve(true);
    };
    dlg.oncancel = () => resolve(false);  // Esc: give up on this request
    dlg.showModal();
  });
}

/** fetch on the serving origin; a 401 asks for the key (once per wrong key) and retries. */
async function api(path, opts = {}) {
  for (;;) {
    const res = await fetch(path, { ...opts, headers: headers() });
    if (res.status !== 401) return res;
    const had = sessionStorage.getItem(KEY_STORE);
    if (!(await askKey(had ? "That key was refused; try again." : ""))) throw new Error("this server needs an API key");
  }
}

async function loadServer() {
  try {
    const [models, info] = [await api("/v1/models"), await api("/v1/entropix/info")];
    if (!models.ok || !info.ok) throw new Error(await errorText(models.ok ? info : models));
    app.models = (await models.json()).data.map((m) => m.id);
    const inf = await info.json();
    app.specs = Object.fromEntries(inf.sampler_specs.map((s) => [s.name, s]));
    $("server-model").textContent = `serving ${inf.model} · v${inf.version}`;
    $("model").replaceChildren(...app.models.map((m) => new Option(m, m)));
    $("sampler").replaceChildren(...inf.sampler_specs.map((s) => new Option(s.name, s.name)));
    setStatus("ready");
    return true;
  } catch (e) {
    setStatus(`cannot reach the server (${e.message})`, "error");
    return false;
  }
}

function defaultSampler() {
  const last = localStorage.getItem("entropix.chat.sampler");
  if (last && app.specs[last]) return last;
  return app.specs.entropix ? "entropix" : Object.keys(app.specs)[0] || "greedy";
}

// -- the sidebar -------------------------------------------------------------------------
function renderSidebar() {
  const ul = $("conversations");
  ul.replaceChildren(...app.data.conversations.map(conversationItem));
}

/** The header names the conversation on screen: shown again whenever a title may change (the
 * first message names a conversation, a rename) and on switching, or it keeps an old name. */
function renderTitle() {
  const conv = current();
  $("title").textContent = conv ? conv.title : "";
  $("title").title = $("title").textContent;  // the whole name where the header cuts it short
}

function conversationItem(conv) {
  const li = node("li", `conv${conv.id === app.data.current ? " active" : ""}`);
  li.dataset.id = conv.id;
  const open = node("button", "conv-title", conv.title);
  open.type = "button";
  open.title = conv.title;
  open.addEventListener("click", () => select(conv.id));
  const rename = node("button", "icon rename", "✎");
  rename.type = "button";
  rename.title = "rename";
  rename.setAttribute("aria-label", `rename ${conv.title}`);
  rename.addEventListener("click", () => startRename(li, conv));
  const del = node("button", "icon delete", "✕");
  del.type = "button";
  del.title = "delete";
  del.setAttribute("aria-label", `delete ${conv.title}`);
  del.addEventListener("click", () => askDelete(del, conv));
  li.append(open, rename, del);
  return li;
}

function startRename(li, conv) {
  const input = node("input", "rename-input");
  input.value = conv.title;
  input.setAttribute("aria-label", "conversation name");
  li.replaceChildren(input);
  input.focus();
  input.select();
  let done = false;
  const finish = (keep) => {
    if (done) return;
    done = true;
    if (keep && input.value.trim()) { conv.title = input.value.trim().slice(0, 80); conv.renamed = true; persist(); }
    renderSidebar();
    renderTitle();
  };
  input.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter") { ev.preventDefault(); finish(true); }
    if (ev.key === "Escape") { ev.preventDefault(); ev.stopPropagation(); finish(false); }
  });
  input.addEventListener("blur", () => finish(true));
}

function askDelete(button, conv) {  // two clicks, no native dialog
  if (!button.classList.contains("confirm")) {
    button.classList.add("confirm");
    button.textContent = "Delete?";
    setTimeout(() => { if (button.isConnected) { button.classList.remove("confirm"); button.textContent = "✕"; } }, 4000);
    return;
  }
  if (app.live && app.live.conv === conv) stop();
  ChatStore.remove(app.data, conv.id);
  if (!app.data.conversations.length) ChatStore.create(app.data, { model: app.models[0], sampler: defaultSampler() });
  persist();
  renderAll();
}

function select(id) {
  app.data.current = id;
  persist();
  renderAll();
  document.body.classList.remove("drawer");
}

function newChat() {
  const cur = current();
  if (cur && !cur.messages.length) { select(cur.id); $("prompt").focus(); return; }  // reuse an empty one
  ChatStore.create(app.data, { model: app.models[0], sampler: cur ? cur.sampler : defaultSampler() });
  persist();
  renderAll();
  document.body.classList.remove("drawer");
  $("prompt").focus();
}

// -- the conversation -------------------------------------------------------------------------
function renderAll() {
  renderSidebar();
  const conv = current();
  renderTitle();
  if (!app.models.includes(conv.model) && app.models.length) conv.model = app.models[0];
  if (!app.specs[conv.sampler]) conv.sampler = defaultSampler();
  $("model").value = conv.model;
  $("sampler").value = conv.sampler;
  $("system").value = conv.system || "";
  $("max-tokens").value = conv.maxTokens || "";
  $("sampler-help").textContent = app.specs[conv.sampler] ? `${conv.sampler}: ${app.specs[conv.sampler].help}.` : "";
  const rows = rowsOption(conv.sampler);
  $("rows-field").hidden = !rows;
  if (rows) {
    $("rows-label").textContent = rows === "branches" ? "Branches" : "Samples";
    $("rows").placeholder = `${app.specs[conv.sampler].defaults[rows] ?? ""} (default)`;
    $("rows").value = conv.rows || "";
  }
  renderTranscript(conv);
}

function renderTranscript(conv) {
  const tr = $("transcript");
  if (!conv.messages.length) {
    tr.replaceChildren(emptyNote());
    return;
  }
  tr.replaceChildren(...conv.messages.map((m, i) => messageEl(conv, m, i)));
  tr.scrollTop = tr.scrollHeight;
}

function emptyNote() {
  const d = node("div", "empty");
  d.append(node("h2", null, "Ask anything"),
    node("p", null, "Answers stream as markdown. Open “Show thinking” under an answer to see what the sampler did: its regime mix, pauses, forks and branches."));
  return d;
}

const lastIndex = (conv, role) => conv.messages.map((m) => m.role).lastIndexOf(role);

function messageEl(conv, msg, i) {
  const wrap = node("div", `msg ${msg.role}`);
  const body = node("div", "body");
  wrap.append(body);
  if (msg.role === "user") {
    body.textContent = msg.content;
    if (i === lastIndex(conv, "user") && !app.live) wrap.append(userActions(conv, msg, wrap));
  } else {
    fillAnswer(body, msg.content, msg.meta);
    wrap.append(answerFooter(conv, msg, i));
  }
  return wrap;
}

function fillAnswer(body, text, meta) {
  if (app.colour && meta && meta.tokens && meta.tokens.length) {
    body.replaceChildren(ChatThinking.colouredTokens(meta.tokens));
  } else {
    body.replaceChildren(EntropixMarkdown.render(text));
  }
  body.classList.toggle("coloured", Boolean(app.colour && meta && meta.tokens && meta.tokens.length));
}

function userActions(conv, msg, wrap) {
  const bar = node("div", "actions");
  const edit = node("button", "link edit", "Edit");
  edit.type = "button";
  edit.addEventListener("click", () => startEdit(conv, msg, wrap));
  bar.append(edit);
  return bar;
}

function startEdit(conv, msg, wrap) {
  const area = node("textarea", "edit-area");
  area.value = msg.content;
  area.rows = Math.min(10, msg.content.split("\n").length + 1);
  const save = node("button", "primary", "Save & send");
  save.type = "button";
  const cancel = node("button", null, "Cancel");
  cancel.type = "button";
  const bar = node("div", "actions");
  bar.append(save, cancel);
  wrap.replaceChildren(area, bar);
  area.focus();
  cancel.addEventListener("click", () => renderTranscript(conv));
  const go = () => {
    const text = area.value.trim();
    if (!text || app.live) return;
    conv.messages.splice(conv.messages.indexOf(msg));  // the message and the answers after it
    conv.messages.push({ role: "user", content: text });
    generate(conv);
  };
  save.addEventListener("click", go);
  area.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) { ev.preventDefault(); go(); }
  });
}

function stats(meta) {
  const parts = [];
  const rows = meta.choices ? meta.choices.length : 1;
  if (rows > 1 && meta.tokens) {  // the shown branch's tokens, then every branch's
    parts.push(`${meta.tokens.length} tokens`, `${meta.completion} generated over ${rows} branches`);
  } else if (meta.completion !== undefined) parts.push(`${meta.completion} tokens`);
  if (meta.seconds) parts.push(`${(meta.completion / Math.max(meta.seconds, 1e-3)).toFixed(1)} tok/s`, `${meta.seconds.toFixed(1)} s`);
  if (meta.prompt !== undefined && meta.prompt !== null) parts.push(`prompt ${meta.prompt}`);
  if (meta.sampler) parts.push(meta.sampler);
  if (meta.stopped) parts.push("stopped");
  return parts.join(" · ");
}

function answerFooter(conv, msg, i) {
  const foot = node("div", "answer-foot");
  const meta = msg.meta || {};
  if (meta.error) foot.append(node("div", "error", meta.error));
  const line = node("div", "stats", stats(meta));
  const bar = node("div", "actions");
  const copy = node("button", "link copy-answer", "Copy");
  copy.type = "button";
  copy.addEventListener("click", () => navigator.clipboard?.writeText(msg.content).then(() => { copy.textContent = "Copied"; }, () => {}));
  bar.append(copy);
  if (i === conv.messages.length - 1 && !app.live) {
    const regen = node("button", "link regenerate", "Regenerate");
    regen.type = "button";
    regen.addEventListener("click", () => regenerate(conv));
    bar.append(regen);
  }
  line.append(bar);
  foot.append(line);
  if (msg.meta && !msg.meta.streaming) foot.append(ChatThinking.thinking(msg.meta));
  return foot;
}

// -- sending -----------------------------------------------------------------------------
function send(text) {
  const conv = current();
  if (!text || app.live) return;
  if (!conv.messages.length && !conv.renamed) {
    conv.title = ChatStore.titleFrom(text);
    renderSidebar();  // named now, not when the answer ends
    renderTitle();
  }
  conv.messages.push({ role: "user", content: text });
  generate(conv);
}

function regenerate(conv) {
  if (app.live) return;
  if (conv.messages.length && conv.messages[conv.messages.length - 1].role === "assistant") conv.messages.pop();
  generate(conv);
}

/** The option that sets a multi-row sampler's rows ("branches", "samples"), if it has one. */
function rowsOption(sampler) {
  const sp = app.specs[sampler];
  return sp ? ["branches", "samples"].find((k) => sp.options.includes(k)) : undefined;
}

function requestBody(conv) {
  const msgs = conv.messages.map((m) => ({ role: m.role, content: m.content }));
  if (conv.system && conv.system.trim()) msgs.unshift({ role: "system", content: conv.system.trim() });
  const body = { model: conv.model || app.models[0], messages: msgs, stream: true,
    stream_options: { include_usage: true }, sampler: conv.sampler, metrics: true };
  if (conv.maxTokens) body.max_tokens = conv.maxTokens;
  const rows = rowsOption(conv.sampler);
  if (rows && conv.rows) body[rows] = conv.rows;
  return body;
}

function stop() {
  if (app.controller) app.controller.abort();
}

async function generate(conv) {
  const body = requestBody(conv);
  const msg = { role: "assistant", content: "", meta: { sampler: body.sampler, model: body.model, streaming: true } };
  conv.messages.push(msg);
  conv.updated = Date.now();
  persist();
  renderTranscript(conv);
  const el = $("transcript").lastElementChild;
  const run = new ChatStream.Run();
  app.live = { conv, msg, el, run };
  app.controller = new AbortController();
  setBusy(true);
  setStatus("waiting for the model…", "busy");
  const t0 = performance.now();
  try {
    const res = await api("/v1/chat/completions", { method: "POST", body: JSON.stringify(body), signal: app.controller.signal });
    if (!res.ok) throw new Error(await errorText(res));
    await ChatStream.stream(res, run, () => { liveUpdate(run, t0); });
    setStatus("done");
  } catch (e) {
    if (e.name === "AbortError") { msg.meta.stopped = true; setStatus("stopped"); }
    else { msg.meta.error = e.message; setStatus("error", "error"); }
  }
  finishAnswer(conv, msg, run, (performance.now() - t0) / 1000);
}

function liveUpdate(run, t0) {
  const live = app.live;
  if (!live) return;
  if (!live.el.isConnected && current() === live.conv) live.el = $("transcript").lastElementChild;  // re-rendered
  live.msg.content = run.shown().text;
  const n = run.usage ? run.usage.completion_tokens : run.tokenCount();
  setStatus(`streaming… ${n} tokens · ${((n * 1000) / Math.max(performance.now() - t0, 1)).toFixed(1)} tok/s`, "busy");
  if (app.rendering) return;
  app.rendering = true;
  requestAnimationFrame(() => {  // at most one markdown render per frame
    app.rendering = false;
    if (app.live !== live) return;
    const shown = live.run.shown();
    fillAnswer(live.el.querySelector(".body"), shown.text, { tokens: shown.tokens });
    live.el.dataset.tokens = String(live.run.tokenCount());
    const tr = $("transcript");
    if (tr.scrollHeight - tr.scrollTop - tr.clientHeight < 160) tr.scrollTop = tr.scrollHeight;
  });
}

function finishAnswer(conv, msg, run, seconds) {
  msg.content = run.shown().text;
  delete msg.meta.streaming;
  Object.assign(msg.meta, run.meta(seconds, msg.meta.sampler));
  conv.updated = Date.now();
  app.live = null;
  app.controller = null;
  setBusy(false);
  persist();
  if (current() === conv) renderTranscript(conv);
  renderSidebar();
}

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
  document.body.classList.toggle("busy", busy);
}

// -- wiring ---------------------------------------------------------------------------------
function saveSetting(fn) {
  const conv = current();
  if (!conv) return;
  fn(conv);
  persist();
}

function wire() {
  $("new-chat").addEventListener("click", newChat);
  $("composer").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const text = $("prompt").value.trim();
    if (!text || app.live) return;
    $("prompt").value = "";
    autosize();
    send(text);
  });
  $("prompt").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) { ev.preventDefault(); $("composer").requestSubmit(); }
  });
  $("prompt").addEventListener("input", autosize);
  document.addEventListener("keydown", (ev) => { if (ev.key === "Escape" && app.live) { ev.preventDefault(); stop(); } });
  $("stop").addEventListener("click", stop);
  $("model").addEventListener("change", () => saveSetting((c) => { c.model = $("model").value; }));
  $("sampler").addEventListener("change", () => {
    localStorage.setItem("entropix.chat.sampler", $("sampler").value);
    saveSetting((c) => { c.sampler = $("sampler").value; });
    renderAll();
  });
  $("system").addEventListener("change", () => saveSetting((c) => { c.system = $("system").value; }));
  $("max-tokens").addEventListener("change", () => saveSetting((c) => {
    const v = parseInt($("max-tokens").value, 10);
    c.maxTokens = Number.isFinite(v) && v > 0 ? v : null;
  }));
  $("rows").addEventListener("change", () => saveSetting((c) => {
    const v = parseInt($("rows").value, 10);
    c.rows = Number.isFinite(v) && v > 0 ? v : null;
  }));
  $("colour").checked = app.colour;
  $("colour").addEventListener("change", () => {
    app.colour = $("colour").checked;
    localStorage.setItem("entropix.chat.colour", app.colour ? "1" : "0");
    if (!app.live) renderTranscript(current());
  });
  $("settings-toggle").addEventListener("click", () => {
    const open = $("settings").hidden;
    $("settings").hidden = !open;
    $("settings-toggle").setAttribute("aria-expanded", String(open));
  });
  $("menu").addEventListener("click", () => document.body.classList.toggle("drawer"));
  $("scrim").addEventListener("click", () => document.body.classList.remove("drawer"));
}

function autosize() {
  const p = $("prompt");
  p.style.height = "auto";
  p.style.height = `${Math.min(p.scrollHeight, 220)}px`;
}

async function init() {
  wire();
  await loadServer();
  if (!app.data.conversations.length) ChatStore.create(app.data, { model: app.models[0], sampler: defaultSampler() });
  if (!current()) app.data.current = app.data.conversations[0].id;
  for (const c of app.data.conversations) {  // an answer that was streaming when the page went away
    for (const m of c.messages) if (m.meta && m.meta.streaming) { delete m.meta.streaming; m.meta.stopped = true; }
  }
  persist();
  renderAll();
  document.body.dataset.ready = "1";
  $("prompt").focus();
}

window.entropixChat = { render: (text) => EntropixMarkdown.render(text), app };
init();
