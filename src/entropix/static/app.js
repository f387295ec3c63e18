// entropix playground: streams tokens from the OpenAI-compatible API and shows the
// model's uncertainty per token. Plain JavaScript, no libraries.
"use strict";

const $ = (id) => document.getElementById(id);

const REGIME_COLOURS = {  // the sampler's per-token regimes
  greedy: "#64748b", sample: "#0d9488", flowing: "#2563eb", treading: "#d97706",
  branch: "#7c3aed", resample: "#dc2626", adaptive: "#16a34a", pause: "#ca8a04",
  "cot-branch": "#0891b2",
};
// The server's sampler catalogue (/v1/entropix/info): name -> {help, strategy, options, defaults, regimes}
// (strategy: the multi-row algorithm; regimes: the per-token decisions its records name).
let SPECS = {};
const spec = (name) => SPECS[name] || { help: "", strategy: "single", options: [], defaults: {} };
const isMulti = (name) => ["cot", "self-consistency", "auto"].includes(spec(name).strategy);  // scored branches side by side

const ui = {
  mode: "chat",
  messages: [],           // chat history sent with each request
  points: [],             // {h, v, regime, el}
  thresholds: {},          // the model's entropix profile, from /v1/entropix/info
  counts: {},
  controller: null,
  hot: null,              // point highlighted from a hovered token
  model: "default",
};

// A record's regime; "state" is the field's older name (the server sends both).
const regimeOf = (entry) => entry.regime ?? entry.state;

function colourOf(regime) {
  if (REGIME_COLOURS[regime]) return REGIME_COLOURS[regime];
  let h = 0;
  for (const ch of String(regime)) h = (h * 31 + ch.charCodeAt(0)) % 360;
  return `hsl(${h} 65% 45%)`;
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("apikey").value.trim();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

function setStatus(text, kind = "") {
  const el = $("status");
  el.textContent = text;
  el.className = `status ${kind}`;
}


// -- set-up ---------------------------------------------------------------------------
async function loadInfo() {
  try {
    const res = await fetch("/v1/entropix/info", { headers: headers() });
    if (!res.ok) {
      setStatus(res.status === 401 ? "enter the API key" : await errorText(res), "error");
      return;
    }
    const info = await res.json();
    ui.model = info.model;
    $("model").textContent = info.model;
    if (info.thresholds) ui.thresholds = { ...ui.thresholds, ...info.thresholds };
    fillSamplers(info.sampler_specs);
    syncFields();
    setStatus("ready");
    drawScatter();
  } catch (e) {
    setStatus(`cannot reach the server (${e.message})`, "error");
  }
}

function fillSamplers(specs) {
  SPECS = Object.fromEntries(specs.map((sp) => [sp.name, sp]));
  const sel = $("sampler");
  const wanted = localStorage.getItem("entropix.sampler") || (SPECS.entropix ? "entropix" : "greedy");
  sel.replaceChildren(...specs.map((sp) => new Option(sp.name, sp.name)));
  sel.value = SPECS[wanted] ? wanted : specs[0].name;
  for (const k of ["branches", "samples"]) {  // defaults come from the catalogue too
    const owner = specs.find((sp) => k in sp.defaults);
    if (owner) $(k).placeholder = `${owner.defaults[k]} (default)`;
  }
}

function syncFields() {
  const sp = spec($("sampler").value);
  $("sampler-help").textContent = sp.help ? sp.help[0].toUpperCase() + sp.help.slice(1) + "." : "";
  for (const el of document.querySelectorAll("[data-option]")) {
    el.classList.toggle("hidden", !sp.options.includes(el.dataset.option));
  }
  for (const el of document.querySelectorAll("[data-strategy]")) {
    el.classList.toggle("hidden", !el.dataset.strategy.split(" ").includes(sp.strategy));
  }
  for (const el of document.querySelectorAll("[data-mode-only]")) {
    el.classList.toggle("hidden", el.dataset.modeOnly !== ui.mode);
  }
}

function setMode(mode) {
  ui.mode = mode;
  for (const t of document.querySelectorAll(".tab")) {
    const on = t.dataset.mode === mode;
    t.classList.toggle("active", on);
    t.setAttribute("aria-selected", String(on));
  }
  $("prompt").placeholder = mode === "chat"
    ? "How many r's are in the word strawberry?"
    : "Once upon a time,";
  syncFields();
}

// -- request --------------------------------------------------------------------------
function num(id, int = false) {
  const v = $(id).value.trim();
  if (v === "") return undefined;
  const x = int ? parseInt(v, 10) : parseFloat(v);
  return Number.isFinite(x) ? x : undefined;
}

function buildBody(text) {
  const sampler = $("sampler").value;
  const body = { model: ui.model, stream: true, stream_options: { include_usage: true }, sampler, metrics: true };
  const sp = spec(sampler);
  const takes = (k) => sp.options.includes(k);
  const mt = num("max_tokens", true);
  if (mt !== undefined) body.max_tokens = mt;
  for (const k of ["temperature", "top_p", "min_p"]) { const v = num(k); if (takes(k) && v !== undefined) body[k] = v; }
  for (const k of ["top_k", "branches", "samples"]) { const v = num(k, true); if (takes(k) && v !== undefined) body[k] = v; }
  const seed = num("seed", true);
  if (takes("temperature") && seed !== undefined) body.seed = seed;  // the seed field shows for sampling samplers
  if (takes("aggregate") && $("aggregate").checked) body.aggregate = true;
  if (isMulti(sampler) && $("answer_format").value) body.answer_format = $("answer_format").value;  // else the server reads the prompt
  if (takes("sampler_config") && $("sampler_config").value.trim()) {
    body.sampler_config = JSON.parse($("sampler_config").value); // a SyntaxError is shown to the user
  }
  if (ui.mode === "chat") {
    const sys = $("system").value.trim();
    body.messages = [...(sys ? [{ role: "system", content: sys }] : []), ...ui.messages, { role: "user", content: text }];
  } else {
    body.prompt = text;
  }
  return body;
}

// -- output ---------------------------------------------------------------------------
function addMessage(role, label) {
  $("empty")?.remove();
  const wrap = document.createElement("div");
  wrap.className = `msg ${role}`;
  const who = document.createElement("div");
  who.className = "who";
  who.textContent = label;
  wrap.append(who);
  $("transcript").append(wrap);
  return wrap;
}

class Output {
  // One assistant answer: a single body, or one column per branch for cot / self-consistency.
  constructor(wrap, multi, echo) {
    this.wrap = wrap;
    this.multi = multi;
    this.bodies = new Map();
    this.texts = new Map();
    this.grid = null;
    this.echo = echo;
  }

  body(index) {
    if (this.bodies.has(index)) return this.bodies.get(index);
    let body;
    if (!this.multi) {
      body = document.createElement("div");
      body.className = "body gen";
      if (this.echo) {
        const e = document.createElement("span");
        e.className = "prompt-echo";
        e.textContent = this.echo;
        body.append(e);
      }
      this.wrap.append(body);
    } else {
      if (!this.grid) {
        this.grid = document.createElement("div");
        this.grid.className = "branches";
        this.wrap.append(this.grid);
      }
      const col = document.createElement("div");
      col.className = "branch";
      col.dataset.index = index;
      col.innerHTML = `<div class="bhead"><b>branch ${index}</b><span class="ans"></span></div>
        <div class="conf"><span></span></div><div class="body gen"></div>`;
      // keep columns in index order whatever order they arrive in
      const later = [...this.grid.children].find((c) => Number(c.dataset.index) > index);
      this.grid.insertBefore(col, later || null);
      body = col.querySelector(".body");
    }
    this.bodies.set(index, body);
    this.texts.set(index, "");
    return body;
  }

  addToken(index, entry) {
    const body = this.body(index);
    this.texts.set(index, this.texts.get(index) + entry.text);
    const span = document.createElement("span");
    span.className = "tok";
    span.textContent = entry.text;
    const regime = regimeOf(entry);
    span.style.setProperty("--c", colourOf(regime));
    span.dataset.regime = regime;
    span._entry = entry;
    body.append(span);
    const point = { h: entry.entropy ?? 0, v: entry.varentropy ?? 0, regime, el: span };
    span._point = point;
    ui.points.push(point);
    ui.counts[regime] = (ui.counts[regime] || 0) + 1;
  }

  addText(index, text) {  // a delta without metrics
    if (!text) return;
    this.body(index).append(document.createTextNode(text));
    this.texts.set(index, this.texts.get(index) + text);
  }

  finishChoice(c) {
    if (!this.multi) return;
    const col = this.body(c.index).parentElement;
    const parts = [];
    if (c.answer !== undefined) parts.push(`answer ${c.answer === null ? "—" : c.answer}`);
    if (typeof c.confidence === "number") parts.push(`conf ${c.confidence.toFixed(3)}`);
    col.querySelector(".ans").textContent = parts.join(" · ");
    if (c.follow_up && !col.querySelector(".follow")) {  // the "So the answer is" step of a branch without an answer
      const f = document.createElement("div");
      f.className = "follow";
      f.textContent = c.follow_up.trim();
      col.append(f);
    }
    if (typeof c.confidence === "number") {
      col.querySelector(".conf > span").style.width = `${Math.max(2, Math.min(100, c.confidence * 100))}%`;
    }
  }

  choose(index, answer) {
    if (!this.grid) return;
    for (const col of this.grid.children) {
      const on = Number(col.dataset.index) === index;
      col.classList.toggle("chosen", on);
      if (on && !col.querySelector(".badge")) {
        const b = document.createElement("span");
        b.className = "badge";
        b.textContent = "chosen";
        col.querySelector(".bhead").append(b);
      }
    }
    const v = document.createElement("div");
    v.className = "verdict";
    v.textContent = `Chosen: branch ${index}${answer !== undefined && answer !== null ? ` · answer ${answer}` : ""}`;
    this.wrap.append(v);
  }

  text(index = 0) { return this.texts.get(index) || ""; }
}

// -- streaming ------------------------------------------------------------------------

async function generate(text) {
  let body;
  try {
    body = buildBody(text);
  } catch (e) {
    setStatus(`sampler_config is not valid JSON: ${e.message}`, "error");
    return;
  }
  const chat = ui.mode === "chat";
  if (chat) {
    const u = addMessage("user", "you");
    const b = document.createElement("div");
    b.className = "body";
    b.textContent = text;
    u.append(b);
  }
  const wrap = addMessage("assistant", `${ui.model} · ${body.sampler}`);
  const out = new Output(wrap, isMulti(body.sampler), chat ? null : text);
  const route = chat ? "/v1/chat/completions" : "/v1/completions";
  ui.controller = new AbortController();
  $("send").disabled = true;
  $("stop").disabled = false;
  setStatus("generating…", "busy");
  const t0 = performance.now();
  let tokens = 0, chosen = 0, usage = null;
  try {
    const res = await fetch(route, { method: "POST", headers: headers(), body: JSON.stringify(body), signal: ui.controller.signal });
    if (!res.ok) throw new Error(await errorText(res));
    for await (const ev of sseEvents(res)) {
      if (ev.error) throw new Error(ev.error.message);
      if (ev.entropix_thresholds) { ui.thresholds = { ...ui.thresholds, ...ev.entropix_thresholds }; }
      if (ev.usage) usage = ev.usage;
      for (const c of ev.choices || []) {
        if (c.entropix && c.entropix.length) {
          for (const entry of c.entropix) { out.addToken(c.index, entry); tokens++; }
        } else {
          out.addText(c.index, chat ? c.delta?.content : c.text);
        }
        if (c.finish_reason) out.finishChoice(c);
      }
      if (ev.cot_choice !== undefined) { chosen = ev.cot_choice; out.choose(ev.cot_choice, ev.answer); }
      scheduleDraw();
      const secs = (performance.now() - t0) / 1000;
      showStats({ tokens, secs, usage });
      $("transcript").scrollTop = $("transcript").scrollHeight;
    }
    setStatus("done");
  } catch (e) {
    if (e.name === "AbortError") {
      setStatus("stopped");
    } else {
      const err = document.createElement("div");
      err.className = "err";
      err.textContent = e.message;
      wrap.append(err);
      setStatus("error", "error");
    }
  } finally {
    ui.controller = null;
    $("send").disabled = false;
    $("stop").disabled = true;
    drawScatter();
  }
  if (chat) {
    ui.messages.push({ role: "user", content: text }, { role: "assistant", content: out.text(chosen) });
  }
}

function showStats({ tokens, secs, usage }) {
  const rows = [["tokens", tokens], ["time", `${secs.toFixed(1)} s`], ["tokens/s", (tokens / Math.max(secs, 1e-3)).toFixed(1)]];
  if (usage) rows.push(["prompt", usage.prompt_tokens]);
  for (const [k, n] of Object.entries(ui.counts).sort((a, b) => b[1] - a[1])) {
    rows.push([k, `${n} (${((100 * n) / ui.points.length).toFixed(0)}%)`]);
  }
  const dl = $("stats");
  dl.replaceChildren();
  for (const [k, v] of rows) {
    const dt = document.createElement("dt"); dt.textContent = k;
    const dd = document.createElement("dd"); dd.textContent = v;
    dl.append(dt, dd);
  }
}

// -- scatter --------------------------------------------------------------------------
let drawPending = false;
function scheduleDraw() {
  if (drawPending) return;
  drawPending = true;
  requestAnimationFrame(() => { drawPending = false; drawScatter(); });
}

function drawScatter() {
  const cv = $("scatter");
  const dpr = window.devicePixelRatio || 1;
  const cssW = cv.clientWidth || 360, cssH = cv.clientHeight || 300;
  if (cv.width !== Math.round(cssW * dpr) || cv.height !== Math.round(cssH * dpr)) {
    cv.width = Math.round(cssW * dpr);
    cv.height = Math.round(cssH * dpr);
  }
  const ctx = cv.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, cssW, cssH);
  const th = ui.thresholds;
  const pad = { l: 40, r: 12, t: 12, b: 32 };
  const W = cssW - pad.l - pad.r, H = cssH - pad.t - pad.b;
  let xmax = Math.max(th.high_ent ?? 5, 1) * 1.25, ymax = Math.max(th.high_vent ?? 5, 1) * 1.25;
  for (const p of ui.points) { xmax = Math.max(xmax, p.h * 1.05); ymax = Math.max(ymax, p.v * 1.05); }
  const X = (h) => pad.l + (h / xmax) * W;
  const Y = (v) => pad.t + H - (v / ymax) * H;

  // quadrant names
  ctx.font = "11px system-ui, sans-serif";
  ctx.fillStyle = "#94a3b8";
  const highV = th.high_vent ?? 5;
  ctx.textAlign = "left";
  ctx.fillText("flowing", X(0) + 4, Y(0) - 4);
  ctx.fillText("branch", X(0) + 4, Math.max(pad.t + 12, Y(highV) - 4));
  ctx.textAlign = "right";
  ctx.fillText("treading", X(xmax) - 4, Y(0) - 4);
  ctx.fillText("resample", X(xmax) - 4, Math.max(pad.t + 12, Y(highV) - 4));

  // axes and ticks
  ctx.strokeStyle = "#cbd5e1";
  ctx.lineWidth = 1;
  ctx.beginPath();
  ctx.moveTo(pad.l, pad.t); ctx.lineTo(pad.l, pad.t + H); ctx.lineTo(pad.l + W, pad.t + H);
  ctx.stroke();
  ctx.fillStyle = "#64748b";
  ctx.textAlign = "center";
  for (const t of ticks(xmax)) { ctx.fillText(fmt(t), X(t), pad.t + H + 14); }
  ctx.fillText("entropy (bits)", pad.l + W / 2, cssH - 4);
  ctx.textAlign = "right";
  for (const t of ticks(ymax)) { ctx.fillText(fmt(t), pad.l - 5, Y(t) + 4); }
  ctx.save();
  ctx.translate(11, pad.t + H / 2);
  ctx.rotate(-Math.PI / 2);
  ctx.textAlign = "center";
  ctx.fillText("varentropy (bits²)", 0, 0);
  ctx.restore();

  // threshold lines
  ctx.setLineDash([4, 4]);
  ctx.strokeStyle = "#a5b4fc";
  for (const [key, val] of Object.entries(th)) {
    if (typeof val !== "number") continue;
    ctx.beginPath();
    if (key.endsWith("_vent")) { ctx.moveTo(pad.l, Y(val)); ctx.lineTo(pad.l + W, Y(val)); }
    else if (key.endsWith("_ent")) { ctx.moveTo(X(val), pad.t); ctx.lineTo(X(val), pad.t + H); }
    ctx.stroke();
  }
  ctx.setLineDash([]);

  // points (newest on top)
  for (const p of ui.points) {
    ctx.beginPath();
    ctx.arc(X(p.h), Y(p.v), 3.2, 0, 2 * Math.PI);
    ctx.fillStyle = colourOf(p.regime);
    ctx.globalAlpha = 0.75;
    ctx.fill();
  }
  ctx.globalAlpha = 1;
  if (ui.hot) {
    ctx.beginPath();
    ctx.arc(X(ui.hot.h), Y(ui.hot.v), 7, 0, 2 * Math.PI);
    ctx.strokeStyle = "#111827";
    ctx.lineWidth = 2;
    ctx.stroke();
  }
  cv.dataset.points = String(ui.points.length);
  drawLegend();
}

function ticks(max) {
  const step = [0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50].find((s) => max / s <= 6) || 100;
  const out = [];
  for (let t = 0; t <= max + 1e-9; t += step) out.push(t);
  return out;
}
function fmt(t) { return Number.isInteger(t) ? String(t) : t.toFixed(1); }

function drawLegend() {
  const el = $("legend");
  el.replaceChildren();
  const regimes = Object.keys(ui.counts);
  el.title = "the sampler's regime per token: how many tokens each chose";
  for (const s of regimes.length ? regimes : ["flowing", "treading", "branch", "resample", "adaptive"]) {
    const span = document.createElement("span");
    const dot = document.createElement("i");
    dot.style.background = colourOf(s);
    span.append(dot, document.createTextNode(ui.counts[s] ? `${s} ${ui.counts[s]}` : s));
    el.append(span);
  }
}

// -- tooltip --------------------------------------------------------------------------
function visible(s) {
  return s.replace(/\n/g, "↵").replace(/\t/g, "⇥").replace(/^ /, "·").replace(/ $/, "·") || "∅";
}

function showTooltip(span, ev) {
  const e = span._entry;
  const tip = $("tooltip");
  tip.replaceChildren();
  const head = document.createElement("div");
  head.className = "tt-head";
  const tok = document.createElement("span");
  tok.className = "tt-tok";
  tok.textContent = visible(e.piece ?? e.text);
  const st = document.createElement("span");
  st.className = "tt-regime";
  st.style.background = colourOf(regimeOf(e));
  st.textContent = regimeOf(e);
  st.title = "regime";
  head.append(tok, st);
  tip.append(head);

  const table = document.createElement("table");
  const rows = [["entropy", e.entropy, "bits"], ["varentropy", e.varentropy, "bits²"], ["margin p1−p2", e.margin, ""],
    ["p(token)", e.logprob != null ? Math.exp(e.logprob) : null, ""]];
  for (const k of ["attn_entropy", "attn_entropy_var", "agreement", "interaction"]) {
    if (e[k] !== undefined && e[k] !== null) rows.push([k.replace(/_/g, " "), e[k], ""]);
  }
  for (const [k, v, unit] of rows) {
    if (v === null || v === undefined) continue;
    const tr = document.createElement("tr");
    const a = document.createElement("td"); a.textContent = k;
    const b = document.createElement("td"); b.textContent = `${Number(v).toFixed(3)} ${unit}`.trim();
    tr.append(a, b);
    table.append(tr);
  }
  tip.append(table);

  if (e.top && e.top.length) {
    const sec = document.createElement("div");
    sec.className = "tt-sec";
    sec.textContent = "top alternatives";
    tip.append(sec);
    for (const alt of e.top) {
      const row = document.createElement("div");
      row.className = `alt${alt.token === e.token ? " chosen" : ""}`;
      const t = document.createElement("span"); t.className = "t"; t.textContent = visible(alt.text);
      const bar = document.createElement("span"); bar.className = "bar";
      const fill = document.createElement("span"); fill.style.width = `${Math.round((alt.prob || 0) * 100)}%`;
      bar.append(fill);
      const p = document.createElement("span"); p.className = "p"; p.textContent = `${((alt.prob || 0) * 100).toFixed(1)}%`;
      row.append(t, bar, p);
      tip.append(row);
    }
  }
  tip.hidden = false;
  placeTooltip(ev);
}

function placeTooltip(ev) {
  const tip = $("tooltip");
  const r = tip.getBoundingClientRect();
  let x = ev.clientX + 14, y = ev.clientY + 16;
  if (x + r.width > window.innerWidth - 8) x = ev.clientX - r.width - 14;
  if (y + r.height > window.innerHeight - 8) y = ev.clientY - r.height - 16;
  tip.style.left = `${Math.max(8, x)}px`;
  tip.style.top = `${Math.max(8, y)}px`;
}

// -- wiring ---------------------------------------------------------------------------
function init() {
  const saved = localStorage.getItem("entropix.apikey");
  if (saved) $("apikey").value = saved;
  const saveKey = () => { localStorage.setItem("entropix.apikey", $("apikey").value.trim()); loadInfo(); };
  $("apikey").addEventListener("change", saveKey);
  $("keyform").addEventListener("submit", (ev) => { ev.preventDefault(); saveKey(); });
  $("sampler").addEventListener("change", () => { localStorage.setItem("entropix.sampler", $("sampler").value); syncFields(); });
  for (const t of document.querySelectorAll(".tab")) t.addEventListener("click", () => setMode(t.dataset.mode));

  $("composer").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const text = $("prompt").value.trim() || $("prompt").placeholder;
    if (ui.controller) return;
    $("prompt").value = "";
    generate(text);
  });
  $("prompt").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) $("composer").requestSubmit();
  });
  $("stop").addEventListener("click", () => ui.controller && ui.controller.abort());
  $("clear").addEventListener("click", () => {
    ui.messages = []; ui.points = []; ui.counts = {}; ui.hot = null;
    $("transcript").replaceChildren();
    $("stats").replaceChildren();
    drawScatter();
  });

  const tr = $("transcript");
  tr.addEventListener("mouseover", (ev) => {
    const span = ev.target.closest && ev.target.closest(".tok");
    if (!span || !span._entry) return;
    span.classList.add("hot");
    ui.hot = span._point;
    showTooltip(span, ev);
    scheduleDraw();
  });
  tr.addEventListener("mousemove", (ev) => { if (!$("tooltip").hidden) placeTooltip(ev); });
  tr.addEventListener("mouseout", (ev) => {
    const span = ev.target.closest && ev.target.closest(".tok");
    if (!span) return;
    span.classList.remove("hot");
    ui.hot = null;
    $("tooltip").hidden = true;
    scheduleDraw();
  });
  window.addEventListener("resize", scheduleDraw);

  setMode("chat");
  drawScatter();
  loadInfo();
}

init();
