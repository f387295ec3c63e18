// One streamed chat completion read into its choices: text, per-token records, forks, and the
// strategy's scores (CoT / self-consistency / branching confidences and the chosen choice).
"use strict";

(function (global) {
  // A record as the page keeps it (and chat-store.js saves it): [text, regime, entropy, varentropy,
  // p(token)]. Slot 1 held the same value when the server's field was called "state", so stored
  // conversations read the same; the server sends both names, "regime" first.
  const compact = (e) => [e.text, e.regime ?? e.state, e.entropy, e.varentropy, typeof e.logprob === "number" ? Math.exp(e.logprob) : null];

  class Run {
    constructor() {
      this.choices = new Map();  // index -> {index, text, tokens, n, forkedAt, answer, confidence, finish}
      this.chosen = 0;
      this.usage = null;
      this.thresholds = null;
      this.sampler = null;
    }

    choice(index) {
      if (!this.choices.has(index)) {
        this.choices.set(index, { index, text: "", tokens: [], n: 0, forkedAt: null, answer: undefined,
          confidence: undefined, finish: null });
      }
      return this.choices.get(index);
    }

    add(c) {
      const announced = this.choices.has(c.index);
      const ch = this.choice(c.index);
      const entries = c.entropix || [];
      if (c.delta && c.delta.role) return;  // the opening chunk announces the rows that start together
      // A row the engine forked was never announced; it arrives with its parent's records first,
      // so its own first token is the last one.
      if (!announced && entries.length) ch.forkedAt = entries[entries.length - 1].index;
      ch.text += (c.delta && c.delta.content) || "";
      for (const e of entries) ch.tokens.push(compact(e));
      ch.n += entries.length;
      if (c.finish_reason) ch.finish = c.finish_reason;
      if (c.answer !== undefined) ch.answer = c.answer;
      if (typeof c.confidence === "number") ch.confidence = c.confidence;
      if (c.entropix_branches) this.tree = c.entropix_branches;  // entropix-branching: every path of the tree
    }

    feed(ev) {
      if (ev.error) throw new Error(ev.error.message || "the server reported an error");
      if (ev.entropix_thresholds) this.thresholds = ev.entropix_thresholds;
      if (ev.entropix_sampler) this.sampler = ev.entropix_sampler;
      if (ev.usage) this.usage = ev.usage;
      for (const c of ev.choices || []) this.add(c);
      if (typeof ev.cot_choice === "number") this.chosen = ev.cot_choice;
      if (typeof ev.branch_choice === "number") this.branchChoice = ev.branch_choice;
    }

    shown() { return this.choices.get(this.chosen) || this.choice(0); }

    /** What an answer keeps (chat-store.js): the shown choice's records, counts, speed, scores. */
    meta(seconds, sampler) {
      const m = { sampler: this.sampler || sampler, tokens: this.shown().tokens, seconds,
        completion: this.usage ? this.usage.completion_tokens : this.tokenCount(),
        prompt: this.usage ? this.usage.prompt_tokens : null, thresholds: this.thresholds, chosen: this.chosen };
      if (this.tree) {  // the streamed choice is the root path; the paths come with the last chunk
        m.choices = this.tree.map((b) => ({ index: b.choice, text: (b.text || "").slice(0, 200), answer: b.answer,
          confidence: b.confidence, forkedAt: b.parent ? b.parent[1] : null, n: null }));
        const best = this.tree[this.branchChoice];
        if (best) m.chosen = best.choice;
      } else if (this.choices.size > 1) {
        m.choices = [...this.choices.values()].sort((a, b) => a.index - b.index).map((c) => ({ index: c.index,
          text: c.text.slice(0, 200), answer: c.answer, confidence: c.confidence, forkedAt: c.forkedAt, n: c.n }));
      }
      return m;
    }

    tokenCount() {
      let n = 0;
      for (const c of this.choices.values()) n += c.n;
      return n;
    }
  }

  /** Feed every event of a response to `run`, calling onEvent(run) after each one (an abort
   * throws, and `run` keeps what arrived before it). */
  async function stream(res, run, onEvent) {
    for await (const ev of sseEvents(res)) {
      run.feed(ev);
      onEvent(run);
    }
    return run;
  }

  global.ChatStream = { stream, Run };
})(window);
