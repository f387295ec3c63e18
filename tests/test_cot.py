"""CoT decoding, self-consistency and entropy-triggered branching."""

from __future__ import annotations

import json

import pytest
import torch

from entropix.cli import main
from entropix.cot import Branch, BranchingConfig, BranchingSampler, CotSampler, answer_confidence, choose, majority_vote
from entropix.generate import Engine, Request, TokenRecord, generate, row_seed
from entropix.sampling import make_sampler

QUESTION = "Tom has 3 apples and buys 4 more. How many apples does Tom have now?"


def rec(text, margin, token=0):
    return TokenRecord("r", 0, 0, token, text, -0.1, [], 1.0, 1.0, margin, None, "greedy")


def test_confidence_uses_only_answer_tokens():
    # the reasoning tokens have tiny margins, the answer tokens large ones
    recs = [rec("We add", 0.01), rec(" 3 and 4", 0.02), rec(". The answer is ", 0.03), rec("7", 0.9), rec(".", 0.05)]
    answer, conf, idx = answer_confidence(recs)
    assert answer == "7"
    assert idx == [3]
    assert conf == pytest.approx(0.9)
    # an answer split over two tokens averages exactly those two
    recs = [rec("So it is ", 0.1), rec("1", 0.6), rec("2", 0.4), rec(" apples", 0.0)]
    answer, conf, idx = answer_confidence(recs)
    assert answer == "12" and idx == [1, 2] and conf == pytest.approx(0.5)


def test_no_answer_gives_no_confidence():
    assert answer_confidence([rec("I do not know", 0.9)]) == (None, 0.0, [])


def test_max_and_agg_paths_and_normalised_answers():
    bs = [Branch(0, [], "", "72", 0.5, [], []), Branch(1, [], "", "72", 0.4, [], []),
          Branch(2, [], "", "80", 0.7, [], []), Branch(3, [], "", None, 0.0, [], [])]
    pairs = [(b.answer, b.confidence) for b in bs]
    assert choose(pairs, aggregate=False) == (2, "80")
    assert choose(pairs, aggregate=True) == (0, "72")  # 0.9 summed beats 0.7
    assert choose([(None, 0.0)], aggregate=True) == (0, None)
    assert majority_vote(["72", "72.0", "80", None, "$72"]) == ("72", 0, {"72": 3, "80": 1})
    from entropix.answers import extract_answer
    assert {extract_answer(t) for t in ["72", "72.0", "$72", "72 sheep"]} == {"72"}


@pytest.mark.slow
def test_branch_zero_is_greedy_and_ten_branches_have_answers(lm):
    ids = lm.tokenizer.encode_chat([{"role": "user", "content": QUESTION}])
    greedy = [r.token for r in generate(Engine(lm), [Request(prompt=ids, sampler=make_sampler("greedy"),
                                                             max_tokens=48, stop_ids=lm.tokenizer.stop_ids)])]
    res = CotSampler(branches=10).run_many(Engine(lm), [ids], max_tokens=48)[0]
    assert len(res["branches"]) == 10
    assert res["branches"][0]["tokens"] == greedy
    firsts = [b["tokens"][0] for b in res["branches"]]
    assert len(set(firsts)) == 10  # ten different first tokens, in rank order
    with torch.inference_mode():
        cache = lm.model.new_cache(1, len(ids))
        logits, _ = lm.model(torch.tensor([ids]), cache)
    assert firsts == logits[0].topk(10).indices.tolist()
    answered = [b for b in res["branches"] if b["answer"] is not None]
    assert len(answered) >= 5
    assert all(0 <= b["confidence"] <= 1 for b in res["branches"])
    assert res["answer"] == res["branches"][res["choice"]]["answer"]


def test_cli_cot_json(capsys):
    rc = main(["generate", QUESTION, "--sampler", "cot", "--branches", "4", "--max-tokens", "32", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert len(out["branches"]) == 4
    for b in out["branches"]:
        assert {"tokens", "text", "answer", "confidence"} <= set(b)
    assert out["text"] == out["branches"][out["choice"]]["text"]


def test_self_consistency_rows_have_their_own_streams(lm):
    ids = lm.tokenizer.encode_chat([{"role": "user", "content": "Pick a random animal."}])
    sc = make_sampler("self-consistency", samples=6, temperature=1.0)
    res = sc.run_many(Engine(lm), [ids], max_tokens=12, seed=3)[0]
    texts = [b["text"] for b in res["branches"]]
    assert len(set(texts)) >= 3  # shared RNG streams would make identical rows
    again = sc.run_many(Engine(lm), [ids], max_tokens=12, seed=3)[0]
    assert [b["tokens"] for b in again["branches"]] == [b["tokens"] for b in res["branches"]]
    seeds = {row_seed(3, c) for c in range(64)}
    assert len(seeds) == 64


class ForkAtStep:
    """A test sampler: greedy, reporting "branch" at one chosen step."""

    states = ("greedy", "branch")
    needs_attention = False

    def __init__(self, at):
        self.at = at

    def __call__(self, logits, metrics, rows):
        codes = torch.tensor([1 if len(r.tokens) == self.at else 0 for r in rows])
        return logits.argmax(-1), codes

    def state_of(self, code):
        return self.states[code]


def test_entropy_triggered_branching_forks_and_keeps_prefix(lm):
    ids = lm.tokenizer.encode_chat([{"role": "user", "content": QUESTION}])
    bs = BranchingSampler(ForkAtStep(3), BranchingConfig(max_rows=4, max_forks=2, width=2, min_prob=0.0))
    res = bs.run_many(Engine(lm), [ids], max_tokens=20)[0]
    assert res["forks"] == 1
    assert len(res["branches"]) == 3
    root = res["branches"][0]
    for child in res["branches"][1:]:
        assert child["parent"] == [0, 3]
        assert child["tokens"][:3] == root["tokens"][:3]  # shared prefix up to the fork
        assert child["tokens"][3] != root["tokens"][3]  # an alternative at the fork
    assert res["tokens_generated"] == sum(len(b["tokens"]) for b in res["branches"]) - 2 * 3


def test_branching_respects_row_budget(lm):
    ids = lm.tokenizer.encode("Once upon a time")
    bs = BranchingSampler(ForkAtStep(1), BranchingConfig(max_rows=2, max_forks=5, width=4, min_prob=0.0))
    res = bs.run_many(Engine(lm), [ids], max_tokens=6)[0]
    assert len(res["branches"]) == 2


def test_fork_never_reuses_a_finished_rows_choice(lm):
    """A finished branch's number (and so its seed) is never handed to a later fork."""
    e = Engine(lm)
    e.add([Request(prompt=lm.tokenizer.encode("Hello"), sampler=make_sampler("greedy"), max_tokens=5, seed=1)])
    e.fork(0, 2)
    assert [r.choice for r in e.rows] == [0, 1, 2]
    e._keep([0, 1])  # the row with choice 2 finishes
    e.fork(0, 1)
    assert [r.choice for r in e.rows] == [0, 1, 3]
    assert len({r.generator.initial_seed() for r in e.rows}) == 3
