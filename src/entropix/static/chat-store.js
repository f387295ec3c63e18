// The chat app's conversations, kept in localStorage under one key and restored on reload.
// A conversation: {id, title, model, sampler, system, maxTokens, messages, created, updated};
// a message: {role: "user" | "assistant", content, meta?} (meta: an answer's tokens, speed, thinking).
"use strict";

(function (global) {
  const KEY = "entropix.chat.v1";

  const uid = () => `c${Date.now().toString(36)}${Math.random().toString(36).slice(2, 8)}`;

  function load() {
    try {
      const data = JSON.parse(localStorage.getItem(KEY) || "null");
      if (data && Array.isArray(data.conversations)) return data;
    } catch (_) { /* unreadable: start afresh */ }
    return { conversations: [], current: null };
  }

  /** Save everything; when storage is full, drop the per-token records of the oldest
   * conversations first (the texts stay). False when even the texts do not fit. */
  function save(data) {
    try {
      localStorage.setItem(KEY, JSON.stringify(data));
      return true;
    } catch (_) { /* full: slim a copy below */ }
    const copy = JSON.parse(JSON.stringify(data));
    for (const c of copy.conversations.slice().sort((a, b) => a.updated - b.updated)) {
      for (const m of c.messages) if (m.meta) { delete m.meta.tokens; delete m.meta.choices; }
      try {
        localStorage.setItem(KEY, JSON.stringify(copy));
        return true;
      } catch (_) { /* still full */ }
    }
    return false;
  }

  function create(data, defaults) {
    const now = Date.now();
    const conv = { id: uid(), title: "New chat", model: defaults.model || "", sampler: defaults.sampler || "",
      system: "", maxTokens: null, messages: [], created: now, updated: now };
    data.conversations.unshift(conv);
    data.current = conv.id;
    return conv;
  }

  function find(data, id) {
    return data.conversations.find((c) => c.id === id) || null;
  }

  function remove(data, id) {
    data.conversations = data.conversations.filter((c) => c.id !== id);
    if (data.current === id) data.current = data.conversations[0] ? data.conversations[0].id : null;
  }

  function titleFrom(text) {  // a first message's opening words
    const t = text.replace(/\s+/g, " ").trim();
    return t.length > 40 ? `${t.slice(0, 39)}…` : t || "New chat";
  }

  global.ChatStore = { KEY, load, save, create, find, remove, titleFrom };
})(window);
