// A small, safe markdown renderer for model output. It builds DOM nodes and text nodes only:
// model text is never parsed as HTML, so "<img onerror=...>" stays text. Handles headings,
// paragraphs, lists (nested by indentation), block quotes, fenced code (an unclosed fence, as
// while streaming, runs to the end), tables, rules, and inline code, bold, italic, links.
"use strict";

(function (global) {
  const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([^`\s]*)/;
  const HEADING = /^ {0,3}(#{1,6})\s+(.*?)(?:\s+#+)?\s*$/;
  const RULE = /^ {0,3}([-*_])(?:\s*\1){2,}\s*$/;
  const QUOTE = /^ {0,3}> ?/;
  const ITEM = /^(\s*)([-*+]|\d{1,9}[.)])\s+(.*)$/;
  const TABLE_SEP = /^\s*\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?\s*$/;
  const SAFE_URL = /^(https?:\/\/|mailto:)/i;

  function node(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }

  const indentOf = (line) => line.match(/^\s*/)[0].replace(/\t/g, "    ").length;
  const blank = (line) => !line.trim();

  // -- inline ------------------------------------------------------------------------
  // Earliest match wins; each rule's content is rendered recursively except code.
  const INLINE = [
    { re: /(`+)([\s\S]*?[^`])\1(?!`)/, make: (m) => node("code", null, m[2].trim() ? m[2].replace(/^ (.*) $/, "$1") : m[2]) },
    { re: /\*\*(?=\S)([\s\S]*?\S)\*\*(?!\*)/, make: (m) => wrap("strong", m[1]) },
    { re: /__(?=\S)([\s\S]*?\S)__(?!\w)/, make: (m) => wrap("strong", m[1]) },
    { re: /\*(?=[^\s*])([^*]*?[^\s*])\*/, make: (m) => wrap("em", m[1]) },
    { re: /(?<!\w)_(?=[^\s_])([^_]*?[^\s_])_(?!\w)/, make: (m) => wrap("em", m[1]) },
    { re: /~~(?=\S)([\s\S]*?\S)~~/, make: (m) => wrap("del", m[1]) },
    { re: /\[([^\]]+)\]\(\s*([^\s)]+)(?:\s+"[^"]*")?\s*\)/, make: (m) => link(m[1], m[2]) },
  ];

  function wrap(tag, text) {
    const e = node(tag);
    inline(text, e);
    return e;
  }

  function link(text, url) {
    if (!SAFE_URL.test(url)) return document.createTextNode(`${text} (${url})`);  // javascript:, data: ... stay text
    const a = node("a");
    a.href = url;
    a.rel = "noopener noreferrer nofollow";
    a.target = "_blank";
    inline(text, a);
    return a;
  }

  function inline(text, parent) {
    while (text) {
      let best = null;
      for (const rule of INLINE) {
        const m = rule.re.exec(text);
        if (m && (!best || m.index < best.m.index)) best = { m, rule };
      }
      if (!best) { parent.append(document.createTextNode(text)); return; }
      if (best.m.index) parent.append(document.createTextNode(text.slice(0, best.m.index)));
      parent.append(best.rule.make(best.m));
      text = text.slice(best.m.index + best.m[0].length);
    }
  }

  function lines(parent, textLines) {  // a paragraph's lines, single newlines kept as breaks
    textLines.forEach((l, k) => {
      if (k) parent.append(node("br"));
      inline(l.trim(), parent);
    });
  }

  // -- blocks ------------------------------------------------------------------------
  function codeBlock(lang, code) {
    const box = node("div", "codeblock");
    const head = node("div", "codehead");
    head.append(node("span", "lang", lang || "text"));
    const copy = node("button", "copy", "Copy");
    copy.type = "button";
    copy.addEventListener("click", () => copyText(code, copy));
    head.append(copy);
    const pre = node("pre");
    const c = node("code", null, code);
    if (lang) c.dataset.lang = lang;  // a data attribute, set as text: never markup
    pre.append(c);
    box.append(head, pre);
    return box;
  }

  async function copyText(text, button) {
    try {
      await navigator.clipboard.writeText(text);
    } catch (_) {  // no clipboard API (an insecure origin): select and copy the old way
      const t = node("textarea");
      t.value = text;
      document.body.append(t);
      t.select();
      document.execCommand("copy");
      t.remove();
    }
    button.textContent = "Copied";
    setTimeout(() => { button.textContent = "Copy"; }, 1500);
  }

  function cells(line) {
    let s = line.trim();
    if (s.startsWith("|")) s = s.slice(1);
    if (s.endsWith("|") && !s.endsWith("\\|")) s = s.slice(0, -1);
    return s.split(/(?<!\\)\|/).map((c) => c.trim().replace(/\\\|/g, "|"));
  }

  function table(head, sep, rows) {
    const align = cells(sep).map((c) => (c.startsWith(":") && c.endsWith(":") ? "center" : c.endsWith(":") ? "right" : c.startsWith(":") ? "left" : ""));
    const t = node("table");
    const row = (cs, tag) => {
      const tr = node("tr");
      align.forEach((a, k) => {
        const cell = node(tag);
        if (a) cell.style.textAlign = a;
        inline(cs[k] ?? "", cell);
        tr.append(cell);
      });
      return tr;
    };
    const thead = node("thead");
    thead.append(row(cells(head), "th"));
    const tbody = node("tbody");
    for (const r of rows) tbody.append(row(cells(r), "td"));
    t.append(thead, tbody);
    const box = node("div", "tablewrap");
    box.append(t);
    return box;
  }

  function isTableStart(ls, i) {
    return ls[i].includes("|") && i + 1 < ls.length && ls[i + 1].includes("-") && TABLE_SEP.test(ls[i + 1])
      && (ls[i + 1].includes("|") || cells(ls[i]).length === 1);
  }

  function startsBlock(ls, i) {
    const l = ls[i];
    return FENCE.test(l) || HEADING.test(l) || RULE.test(l) || QUOTE.test(l) || ITEM.test(l) || isTableStart(ls, i);
  }

  function sameList(line, base, ordered) {
    const m = line.match(ITEM);
    return Boolean(m) && indentOf(m[1]) <= base + 1 && /\d/.test(m[2]) === ordered;
  }

  // One list from ls[i]; returns [element, next index]. Items are the lines at the list's
  // indentation; more-indented lines (and blank lines followed by them) belong to the item.
  function list(ls, i) {
    const first = ls[i].match(ITEM);
    const base = indentOf(first[1]);
    const ordered = /\d/.test(first[2]);
    const el = node(ordered ? "ol" : "ul");
    if (ordered && parseInt(first[2], 10) !== 1) el.start = parseInt(first[2], 10);
    const items = [];
    let item = null, loose = false;
    while (i < ls.length) {
      const m = ls[i].match(ITEM);
      if (m && sameList(ls[i], base, ordered)) {
        item = [m[3]];
        items.push(item);
        i++;
      } else if (!blank(ls[i]) && indentOf(ls[i]) > base) {
        item.push(ls[i].slice(Math.min(indentOf(ls[i]), base + 2)));
        i++;
      } else if (blank(ls[i]) && i + 1 < ls.length && !blank(ls[i + 1])
                 && (indentOf(ls[i + 1]) > base || sameList(ls[i + 1], base, ordered))) {
        item.push("");
        loose = true;
        i++;
      } else {
        break;
      }
    }
    for (const itemLines of items) {
      const li = node("li");
      const inner = blocks(itemLines);
      for (const child of [...inner.childNodes]) {  // a tight list's items hold no <p>
        if (!loose && child.tagName === "P") child.replaceWith(...child.childNodes);
      }
      li.append(inner);
      el.append(li);
    }
    return [el, i];
  }

  function blocks(ls) {
    const out = document.createDocumentFragment();
    let i = 0;
    while (i < ls.length) {
      const l = ls[i];
      let m;
      if (blank(l)) { i++; continue; }
      if ((m = l.match(FENCE))) {
        const close = new RegExp(`^ {0,3}${m[1][0]}{${m[1].length},}\\s*$`);
        const indent = new RegExp(`^ {0,${indentOf(l)}}`);  // the fence's own indentation
        const code = [];
        for (i++; i < ls.length && !close.test(ls[i]); i++) code.push(ls[i].replace(indent, ""));
        if (i >= ls.length && code.length && !code[code.length - 1]) code.pop();  // still streaming
        i++;  // past the closing fence (or the end, while it streams)
        out.append(codeBlock(m[2], code.join("\n")));
      } else if ((m = l.match(HEADING))) {
        const h = node(`h${m[1].length}`);
        inline(m[2], h);
        out.append(h);
        i++;
      } else if (RULE.test(l)) {
        out.append(node("hr"));
        i++;
      } else if (QUOTE.test(l)) {
        const inner = [];
        for (; i < ls.length && QUOTE.test(ls[i]); i++) inner.push(ls[i].replace(QUOTE, ""));
        const q = node("blockquote");
        q.append(blocks(inner));
        out.append(q);
      } else if (ITEM.test(l)) {
        const [el, next] = list(ls, i);
        out.append(el);
        i = next;
      } else if (isTableStart(ls, i)) {
        const rows = [];
        let j = i + 2;
        for (; j < ls.length && !blank(ls[j]) && ls[j].includes("|"); j++) rows.push(ls[j]);
        out.append(table(ls[i], ls[i + 1], rows));
        i = j;
      } else {
        const para = [l];
        for (i++; i < ls.length && !blank(ls[i]) && !startsBlock(ls, i); i++) para.push(ls[i]);
        const p = node("p");
        lines(p, para);
        out.append(p);
      }
    }
    return out;
  }

  /** Markdown text -> a DocumentFragment of safe DOM nodes. */
  function render(text) {
    return blocks(String(text ?? "").replace(/\r\n?/g, "\n").split("\n"));
  }

  global.EntropixMarkdown = { render };
})(window);
