// What the sampler did for one answer, from the per-token `entropix` records the stream carries:
// the "Show thinking" block (regime mix, pauses, forks, branches and their confidences) and
// the answer's tokens coloured by regime, as the playground colours them. DOM nodes only.
// A token is the compact record of chat-stream.js, [text, regime, entropy, varentropy, p].
"use strict";

(function (global) {
  const COLOURS = {
    greedy: "#64748b", sample: "#0d9488", flowing: "#2563eb", treading: "#d97706", branch: "#7c3aed",
    resample: "#dc2626", adaptive: "#16a34a", pause: "#ca8a04", "cot-branch": "#0891b2",
  };
  const HELP = {
    flowing: "confident: argmax", treading: "uncertain, flat: careful sampling", pause: "a pause token inserted",
    branch: "a fork in the road: wider top-k", resample: "lost: high temperature", adaptive: "in between: adaptive sampling",
    greedy: "argmax", sample: "plain sampling",
  };

  function colourOf(regime) {
    if (COLOURS[regime]) return COLOURS[regime];
    let h = 0;
    for (const ch of String(regime)) h = (h * 31 + ch.charCodeAt(0)) % 360;
    return `hsl(${h} 65% 45%)`;
  }

  function node(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }

  const fmt = (x, d = 2) => (typeof x === "number" && Number.isFinite(x) ? x.toFixed(d) : "–");

  function tokenTitle(t) {
    const [text, regime, h, v, p] = t;
    return `${JSON.stringify(text)} · ${regime} · entropy ${fmt(h)} bits · varentropy ${fmt(v)} · p ${fmt(p, 3)}`;
  }

  /** The answer as coloured token spans (text nodes; whitespace kept by CSS). */
  function colouredTokens(tokens) {
    const box = node("div", "tokens");
    for (const t of tokens) {
      const s = node("span", "tok", t[0]);
      s.dataset.regime = t[1];
      s.style.setProperty("--c", colourOf(t[1]));
      s.title = tokenTitle(t);
      box.append(s);
    }
    return box;
  }

  function counts(tokens) {
    const c = {};
    for (const t of tokens) c[t[1]] = (c[t[1]] || 0) + 1;
    return Object.entries(c).sort((a, b) => b[1] - a[1]);
  }

  function mix(tokens) {
    const sec = node("div", "mix");
    const bar = node("div", "mixbar");
    const legend = node("ul", "mixlegend");
    for (const [regime, n] of counts(tokens)) {
      const pct = (100 * n) / tokens.length;
      const seg = node("span");
      seg.style.width = `${pct}%`;
      seg.style.background = colourOf(regime);
      seg.title = `${regime} ${n}`;
      bar.append(seg);
      const li = node("li");
      const dot = node("i");
      dot.style.background = colourOf(regime);
      li.append(dot, node("b", null, regime), document.createTextNode(` ${n} (${pct.toFixed(0)}%)`));
      if (HELP[regime]) li.append(node("span", "muted", ` · ${HELP[regime]}`));
      legend.append(li);
    }
    sec.append(node("h4", null, "Regime mix"), bar, legend);
    return sec;
  }

  function mean(tokens, k) {
    const xs = tokens.map((t) => t[k]).filter((x) => typeof x === "number");
    return xs.length ? xs.reduce((a, b) => a + b, 0) / xs.length : null;
  }

  function pauses(tokens) {
    const at = tokens.map((t, i) => (t[1] === "pause" ? i : -1)).filter((i) => i >= 0);
    const text = at.length ? `${at.length} pause token${at.length > 1 ? "s" : ""} inserted, at token${at.length > 1 ? "s" : ""} ${at.join(", ")}`
      : "No pause tokens inserted.";
    return node("p", "pauses", text);
  }

  function branches(meta) {
    const sec = node("div", "branches");
    const forks = meta.choices.filter((c) => c.forkedAt !== null && c.forkedAt !== undefined);
    sec.append(node("h4", null, forks.length ? `Forks taken: ${forks.length}` : `Branches: ${meta.choices.length}`));
    if (forks.length) {
      sec.append(node("p", null, forks.map((c) => `branch ${c.index} forked at token ${c.forkedAt}`).join("; ") + "."));
    }
    const t = node("table");
    const head = node("tr");
    for (const h of ["branch", "answer", "confidence", "tokens", "opening"]) head.append(node("th", null, h));
    t.append(head);
    for (const c of meta.choices) {
      const tr = node("tr", c.index === meta.chosen ? "chosen" : "");
      const conf = node("td");
      if (typeof c.confidence === "number") {
        const b = node("span", "conf");
        b.style.width = `${Math.max(3, Math.min(100, c.confidence * 100))}%`;
        conf.append(b, document.createTextNode(` ${c.confidence.toFixed(3)}`));
      } else conf.textContent = "–";
      tr.append(node("td", null, `${c.index}${c.index === meta.chosen ? " ✓" : ""}`),
        node("td", null, c.answer === undefined || c.answer === null ? "–" : String(c.answer)), conf,
        node("td", null, c.n === null ? "–" : String(c.n || 0)), node("td", "opening", (c.text || "").replace(/\s*\n\s*/g, " ↵ ").slice(0, 60)));
      t.append(tr);
    }
    sec.append(t);
    return sec;
  }

  /** The collapsible "Show thinking" block of one answer. */
  function thinking(meta) {
    const d = node("details", "thinking");
    d.append(node("summary", null, "Show thinking"));
    const tokens = meta.tokens || [];
    const head = [`sampler ${meta.sampler || "?"}`];
    if (tokens.length) head.push(`mean entropy ${fmt(mean(tokens, 2))} bits`, `mean varentropy ${fmt(mean(tokens, 3))} bits²`);
    d.append(node("p", "muted", head.join(" · ")));
    if (tokens.length) {
      d.append(mix(tokens), pauses(tokens));
    } else {
      d.append(node("p", null, "No per-token records for this answer."));
    }
    if (meta.choices && meta.choices.length > 1) d.append(branches(meta));
    if (meta.thresholds) {
      const th = Object.entries(meta.thresholds).map(([k, v]) => `${k} ${fmt(v)}`).join(", ");
      d.append(node("p", "muted small", `thresholds: ${th}`));
    }
    return d;
  }

  global.ChatThinking = { thinking, colouredTokens, colourOf };
})(window);
