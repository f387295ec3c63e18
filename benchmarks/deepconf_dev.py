"""Choosing deepconf's settings on development data, by replaying full self-consistency traces.

    python benchmarks/deepconf_dev.py decode --tasks letters,coinflip --limit 40   # 16 full traces per problem
    python benchmarks/deepconf_dev.py analyse                                       # the grid -> analysis

deepconf draws self-consistency's samples (row c of a prompt has the same seed in both), so a
pruned or skipped trace is a prefix of a full one. `decode` keeps, per trace, every token's
confidence (the prune rule's), its answer and whether its text grades right; `analyse` replays
every setting of the grid on those traces exactly as decode/deepconf.py runs it (warm-up
threshold, prune at the first low window, the consensus stop, the weighted vote) and writes
docs/results-compute-dev/voting/deepconf-analysis.md with the setting it chooses. Development seed 1
only: the fresh seeds are decoded after the choice is committed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEV_DIR = REPO / "docs" / "results-compute-dev" / "voting"
DEV_SEED = 1
SAMPLES, TEMPERATURE, TOP_K = 16, 0.7, 5
# Four warm-up traces: a threshold is a quantile of them, and a consensus a strict majority of their
# weight (two traces would "agree" whenever one outweighs the other). consensus 2.0: never stop early.
GRID = {"warmup": (4,), "keep": (0.1, 0.3, 0.5, 0.7, 0.9), "window": (4, 6, 8, 12, 16),
        "consensus": (0.6, 0.75, 0.9, 1.0, 2.0)}
MAX_SHARE = 0.5  # chosen settings spend at most this share of self-consistency-16's tokens on dev (0.6 asked)
MAX_LOSS = 1  # and lose at most this many problems against it on any dev task


def budgets() -> dict[str, int]:
    sys.path.insert(0, str(REPO / "benchmarks"))
    from fresh_seed9 import BUDGETS

    return BUDGETS


def cmd_decode(args) -> int:
    from entropix.cli.common import compile_step  # a benchmark may use the CLI's helpers
    from entropix.decode.phases import Task, collect, requests_for
    from entropix.decode.scoring import branch_of, token_confidence
    from entropix.evaluate.runner import answer_kind, problem_seed, prompt_tokens
    from entropix.evaluate.tasks import is_correct, load_task
    from entropix.loading import load_model
    from entropix.sampler import catalog

    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    lm = load_model(None, device="cpu", progress=False)
    compile_step(lm)
    dec = catalog.resolve("self-consistency", lm, samples=SAMPLES, temperature=TEMPERATURE)
    engine = lm.engine(dec.capture_layers)
    for name in args.tasks.split(","):
        probs, out = load_task(name, args.limit, DEV_SEED), DEV_DIR / f"{name}_traces16.jsonl"
        done = {json.loads(x)["id"] for x in out.read_text().splitlines()} if out.exists() else set()
        todo = [p for p in probs if p.id not in done]
        for i in range(0, len(todo), args.per_batch):
            chunk = todo[i:i + args.per_batch]
            kind, pattern = answer_kind(chunk[0])
            task = Task(prompts=[prompt_tokens(lm, p) for p in chunk], max_tokens=[budgets()[name]] * len(chunk),
                        seeds=[problem_seed(DEV_SEED, p.id) for p in chunk], stop_ids=lm.tokenizer.stop_ids)
            reqs = requests_for(dec, task, SAMPLES, TOP_K)
            got = collect(engine, reqs)
            with out.open("a") as fh:
                for p, r in zip(chunk, reqs):
                    k, pat = answer_kind(p)
                    traces = []
                    for c in range(SAMPLES):
                        recs = got[r.id][c]
                        b = branch_of(c, recs, k, pat)
                        traces.append({"conf": [round(token_confidence([x for _, _, x in t.top[:TOP_K]]), 5)
                                                for t in recs], "answer": b.answer, "finish": b.finish_reason,
                                       "right": is_correct(p, b.text)[1]})
                    fh.write(json.dumps({"id": p.id, "kind": k, "traces": traces}) + "\n")
            print(f"{name}: {min(i + args.per_batch, len(todo))}/{len(todo)}", file=sys.stderr, flush=True)
    return 0


def pruned_at(conf: list[float], finish: str | None, window: int, cut: float) -> int | None:
    """The token index where the engine's prune rule stops this trace (decode/engine.py), or None."""
    total = 0.0
    for i, x in enumerate(conf):
        total += x - (conf[i - window] if i >= window else 0.0)
        last = i == len(conf) - 1 and finish is not None  # a finished row is not pruned on its last token
        if i >= window - 1 and not last and total / window < cut:
            return i
    return None


def replay(item: dict, warmup: int, keep: float, window: int, consensus: float) -> tuple[bool, int]:
    """(right, tokens) of deepconf with these settings on one problem's full traces."""
    from entropix.decode.deepconf import settled, threshold, weighted_vote
    from entropix.decode.scoring import Branch, lowest_window_confidence

    ts = item["traces"]
    weight = [lowest_window_confidence(t["conf"], window) for t in ts]

    def branch(c: int, conf: list[float], finish) -> Branch:
        return Branch(c, [0] * len(conf), "", ts[c]["answer"], 0.0, [], [], finish)

    warm = [branch(c, ts[c]["conf"], ts[c]["finish"]) for c in range(warmup)]
    cut = threshold(weight[:warmup], keep)
    spent = sum(len(t["conf"]) for t in ts[:warmup])
    bs, ws = list(warm), weight[:warmup]
    if not settled(warm, ws, item["kind"], consensus):
        for c in range(warmup, len(ts)):
            at = pruned_at(ts[c]["conf"], ts[c]["finish"], window, cut)
            conf = ts[c]["conf"] if at is None else ts[c]["conf"][: at + 1]
            bs.append(branch(c, conf, "pruned" if at is not None else ts[c]["finish"]))
            ws.append(weight[c] if at is None else lowest_window_confidence(conf, window))
            spent += len(conf)
    _, i, _ = weighted_vote(bs, ws, item["kind"])
    return ts[i]["right"], spent  # the runner grades the chosen trace's text, as for every sampler


def majority(item: dict) -> tuple[bool, int]:
    from entropix.decode.scoring import majority_vote

    ts = item["traces"]
    _, i, _ = majority_vote([t["answer"] for t in ts], item["kind"])
    return ts[i]["right"], sum(len(t["conf"]) for t in ts)


def _load() -> dict[str, list[dict]]:
    out = {}
    for path in sorted(DEV_DIR.glob("*_traces16.jsonl")):
        out[path.name[: -len("_traces16.jsonl")]] = [json.loads(x) for x in path.read_text().splitlines()]
    return out


def _score(items: dict[str, list[dict]], fn) -> dict[str, tuple[int, int]]:
    """task -> (problems right, tokens spent)"""
    out = {}
    for task, rows in items.items():
        got = [fn(x) for x in rows]
        out[task] = (sum(r for r, _ in got), sum(t for _, t in got))
    return out


def cmd_analyse(args) -> int:
    items = _load()
    sc = _score(items, majority)
    sc_tokens = sum(t for _, t in sc.values())
    rows = []
    for combo in itertools.product(*GRID.values()):
        setting = dict(zip(GRID, combo))
        got = _score(items, lambda x, s=setting: replay(x, **s))
        share = sum(t for _, t in got.values()) / sc_tokens
        ok = share <= MAX_SHARE and all(got[t][0] >= sc[t][0] - MAX_LOSS for t in items)
        rows.append((ok, sum(r for r, _ in got.values()), -share, setting, got, share))
    rows.sort(key=lambda r: (r[0], r[1], r[2]), reverse=True)
    head = "| " + " | ".join(GRID) + " | admissible | " + " | ".join(f"{t} (n={len(v)})" for t, v in items.items())
    lines = ["# deepconf on development seed 1: settings replayed on full self-consistency-16 traces", "",
             f"Budgets (new tokens per trace): {json.dumps({t: budgets()[t] for t in items})}. Self-consistency-16 "
             f"(T={TEMPERATURE}): " + ", ".join(f"{t} {r}/{len(items[t])}" for t, (r, _) in sc.items())
             + f", {sc_tokens} tokens. Grid: {json.dumps(GRID)} (four warm-up traces: a threshold is a quantile of "
             "them and a consensus a strict majority of their weight; consensus 2.0 never stops early). "
             f"Admissible: at most {MAX_SHARE:.0%} of its tokens and at most {MAX_LOSS} "
             "problem(s) fewer right on any task; chosen: the most right in all, then the fewest tokens. Top 20:", "",
             head + " | share of SC-16 tokens |", "|" + "---|" * (len(GRID) + len(items) + 2)]
    for ok, _, _, setting, got, share in rows[:20]:
        lines.append("| " + " | ".join(str(v) for v in setting.values()) + f" | {ok} | "
                     + " | ".join(f"{got[t][0]}" for t in items) + f" | {share:.3f} |")
    best = rows[0]
    lines += ["", "Chosen: " + json.dumps(best[3]) + ("" if best[0] else " (no setting was admissible)")]
    (DEV_DIR / "deepconf-analysis.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("decode")
    d.add_argument("--tasks", default="letters,coinflip,decimals,compare")
    d.add_argument("--limit", type=int, default=40)
    d.add_argument("--per-batch", type=int, default=4, help="problems decoded together (16 rows each)")
    sub.add_parser("analyse")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO / "src"))
    return {"decode": cmd_decode, "analyse": cmd_analyse}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
