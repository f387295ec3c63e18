"""CoT decoding (with its follow-up), self-consistency and entropy-triggered branching:
scoring, choosing, voting, and the strategies driven on an engine."""

from __future__ import annotations

import json

import pytest
import torch

from entropix.cli import main
from entropix.decode.engine import generate
from entropix.decode.records import Request, TokenRecord
from entropix.decode.rng import row_seed
from entropix.decode.scoring import Branch, answer_confidence, branch_of, choose, majority_vote
from entropix.decode.strategies import ANSWER_PROMPT, Phase, Task, decode, follow_ups, run
from entropix.sampler import catalog
from entropix.sampler.config import BranchingConfig, SamplerConfig
from entropix.sampler.policy import Entropix, Greedy

from tinymodel import ByteTokenizer, tiny_lm

QUESTION = "Tom has 3 apples and buys 4 more. How many apples does Tom have now?"


def rec(text, margin, token=0, finish=None):
    return TokenRecord(request_id="r", choice=0, index=0, token=token, text=text, logprob=-0.1, top=[], entropy=1.0,
                       varentropy=1.0, margin=margin, attn=None, regime="greedy", finish_reason=finish)


@pytest.fixture(scope="module")
def tiny():
    return tiny_lm(seed=2)


# -- scoring ----------------------------------------------------------------------------------

def test_confidence_uses_only_answer_tokens():
    recs = [rec("We add", 0.01), rec(" 3 and 4", 0.02), rec(". The answer is ", 0.03), rec("7", 0.9), rec(".", 0.05)]
    assert answer_confidence(recs) == ("7", pytest.approx(0.9), [3])
    recs = [rec("So it is ", 0.1), rec("1", 0.6), rec("2", 0.4), rec(" apples", 0.0)]
    answer, conf, idx = answer_confidence(recs)  # an answer over two tokens averages exactly those two
    assert answer == "12" and idx == [1, 2] and conf == pytest.approx(0.5)
    assert answer_confidence([rec("I do not know", 0.9)]) == (None, 0.0, [])


def test_a_follow_up_answer_is_the_first_after_the_phrase():
    """Bug: the follow-up's text was searched without its phrase, so the last number won."""
    recs = [rec(" 5", 0.8), rec(" apples.", 0.1), rec(" Then", 0.1), rec(" 3", 0.3)]
    answer, conf, idx = answer_confidence(recs, prefix=ANSWER_PROMPT)
    assert (answer, idx) == ("5", [0]) and conf == pytest.approx(0.8)


def test_a_branch_cut_off_by_length_has_no_answer_unless_it_marked_one():
    """Bug: "To add 12 and 7, you simply add them together: " was scored as answer 7."""
    cut = [rec("To add 12 and 7,", 0.99), rec(" you simply add them together: ", 0.99, finish="length")]
    assert branch_of(0, cut, "number", None).answer is None
    marked = [rec("12 + 7 = 19, so the answer is 19", 0.9), rec(". Also", 0.5, finish="length")]
    assert branch_of(0, marked, "number", None).answer == "19"
    done = [rec("12 + 7 = ", 0.9), rec("19", 0.9, finish="stop")]
    assert branch_of(0, done, "number", None).answer == "19"  # a finished branch's last number counts


def test_max_and_agg_paths_group_equal_answers():
    pairs = [("72", 0.5), ("72", 0.4), ("80", 0.7), (None, 0.0)]
    assert choose(pairs, aggregate=False) == (2, "80")
    assert choose(pairs, aggregate=True) == (0, "72")  # 0.9 summed beats 0.7
    assert choose([(None, 0.0)], aggregate=True) == (0, None)
    # Bug: the agg path summed by exact string, so "1/2" and "0.5" were two answers
    assert choose([("1/2", 0.3), ("0.6", 0.5), ("0.5", 0.3)], aggregate=True) == (0, "1/2")
    assert choose([("1/2", 0.3), ("0.6", 0.5), ("0.5", 0.3)], aggregate=False) == (1, "0.6")
    assert majority_vote(["72", "72.0", "80", None, "$72"]) == ("72", 0, {"72": 3, "80": 1})


# -- the follow-up --------------------------------------------------------------------------------

class BosTokenizer(ByteTokenizer):
    BOS = 1

    def encode(self, text, add_bos=None):
        return ([self.BOS] if add_bos is not False else []) + super().encode(text)


def test_follow_ups_never_put_a_bos_mid_sequence():
    tok = BosTokenizer()
    task = Task(prompts=[[1, 70, 71]], max_tokens=[8], seeds=[0], stop_ids=frozenset({0}))
    bs = [[Branch(0, [72, 73, 0], "HI", None, 0.0, [], []), Branch(1, [74], "J", "4", 0.5, [], [])]]
    gen = follow_ups(task, bs, tok, 512)
    phase = next(gen)
    assert isinstance(phase, Phase) and not phase.shown and len(phase.requests) == 1  # only the unanswered one
    prompt = phase.requests[0].prompt
    assert prompt == [1, 70, 71, 72, 73] + tok.encode(ANSWER_PROMPT, add_bos=False)  # stop token dropped
    assert BosTokenizer.BOS not in prompt[1:]
    # the bug's case: the first number after the phrase is the answer, not the last one
    got = {phase.requests[0].id: {0: [rec(" 5", 0.6), rec(" apples.", 0.1), rec(" Then", 0.1), rec(" 3", 0.9)]}}
    with pytest.raises(StopIteration) as done:
        gen.send(got)
    assert done.value.value == [4]  # tokens spent
    assert (bs[0][0].answer, bs[0][0].confidence) == ("5", pytest.approx(0.6))
    assert bs[0][0].follow_up == ANSWER_PROMPT + " 5 apples. Then 3"


# -- strategies on an engine ---------------------------------------------------------------------

def test_cot_branch_zero_is_greedy_and_branches_start_with_the_ranked_tokens(tiny):
    ids = [65, 66, 67, 68]
    task = Task(prompts=[ids], max_tokens=[10], seeds=[0], stop_ids=frozenset({0}), follow_up=False)
    res = run(tiny.engine(), decode(catalog.resolve("cot", tiny, branches=5), task, tiny.tokenizer, 512))[0]
    greedy = [r.token for r in generate(tiny.engine(), [Request(ids, Greedy(), max_tokens=10, stop_ids=frozenset({0}))])]
    assert res["branches"][0]["tokens"] == greedy
    with torch.inference_mode():
        logits, _ = tiny.model(torch.tensor([ids]), tiny.model.new_cache(1, 4))
    assert [b["tokens"][0] for b in res["branches"]] == logits[0].topk(5).indices.tolist()
    assert res["tokens_generated"] == sum(len(b["tokens"]) for b in res["branches"])


def test_self_consistency_rows_have_their_own_streams(tiny):
    dec = catalog.resolve("self-consistency", tiny, samples=6, temperature=1.0)
    task = Task(prompts=[[80, 81]], max_tokens=[8], seeds=[3])
    res = run(tiny.engine(), decode(dec, task, tiny.tokenizer, 512))[0]
    assert len({tuple(b["tokens"]) for b in res["branches"]}) >= 3  # shared streams would give equal rows
    again = run(tiny.engine(), decode(dec, task, tiny.tokenizer, 512))[0]
    assert [b["tokens"] for b in again["branches"]] == [b["tokens"] for b in res["branches"]]
    assert len({row_seed(3, c) for c in range(64)}) == 64


def test_branching_tree_shares_prefixes_and_respects_budgets(tiny):
    cfg = SamplerConfig(low_ent=0.0, low_vent=0.0, med_ent=100.0, high_ent=100.0, med_vent=0.0, high_vent=0.0)
    dec = catalog.Decoder(catalog.spec("entropix-branching"), {}, Entropix(cfg, -1),
                          BranchingConfig(max_rows=4, max_forks=2, width=2, min_prob=0.0))
    task = Task(prompts=[[70, 71, 72]], max_tokens=[8], seeds=[1])
    res = run(tiny.engine(), decode(dec, task, tiny.tokenizer, 512))[0]
    assert 1 <= res["forks"] <= 2 and len(res["branches"]) <= 4
    by = {b["choice"]: b for b in res["branches"]}
    for b in res["branches"]:
        if "parent" in b:
            parent, at = b["parent"]
            assert b["tokens"][:at] == by[parent]["tokens"][:at] and len(b["tokens"]) == 8
            assert b["tokens"][at] != by[parent]["tokens"][at]
    assert res["tokens_generated"] == sum(len(b["tokens"]) - b.get("parent", [0, 0])[1] for b in res["branches"])


def test_many_prompts_in_one_strategy_keep_their_own_results(tiny):
    dec = catalog.resolve("cot", tiny, branches=3)
    prompts = [[65, 66], [67, 68, 69, 70]]
    both = run(tiny.engine(), decode(dec, Task(prompts, [6, 6], [0, 1], frozenset({0})), tiny.tokenizer, 512))
    for p, s, res in zip(prompts, [0, 1], both):
        alone = run(tiny.engine(), decode(dec, Task([p], [6], [s], frozenset({0})), tiny.tokenizer, 512))[0]
        assert [b["tokens"] for b in alone["branches"]] == [b["tokens"] for b in res["branches"]]


def digits_lm(seed: int = 3):
    """A tiny model whose output layer knows only digits, space and "." (every other logit is 0):
    its branches write numbers, so CoT finds answers (in the follow-up where a branch ran out)."""
    lm = tiny_lm(seed=seed)
    keep = set(b"0123456789 .")
    with torch.no_grad():
        for t in range(256):
            if t not in keep:
                lm.model.lm_head.weight[t] = 0
    return lm


def test_cot_with_its_follow_up_finds_answers():
    lm = digits_lm()
    ids = lm.tokenizer.encode_chat([{"role": "user", "content": QUESTION}])
    task = Task(prompts=[ids], max_tokens=[12], seeds=[0], stop_ids=lm.tokenizer.stop_ids)
    res = run(lm.engine(), decode(catalog.resolve("cot", lm), task, lm.tokenizer, lm.config.max_position_embeddings))[0]
    assert len(res["branches"]) == 10 and len({b["tokens"][0] for b in res["branches"]}) == 10
    assert sum(b["answer"] is not None for b in res["branches"]) >= 5
    assert any(b.get("follow_up") for b in res["branches"])  # some answers came from the follow-up
    assert all(0 <= b["confidence"] <= 1 for b in res["branches"])
    assert res["answer"] is not None and res["answer"] == res["branches"][res["choice"]]["answer"]


@pytest.mark.slow
def test_cot_on_the_embedded_model(smol):
    """A smoke test: ten branches of a few tokens on the real tokenizer and chat template (the
    answers are tests/test_strategies.py::test_cot_with_its_follow_up_finds_answers's)."""
    ids = smol.tokenizer.encode_chat([{"role": "user", "content": QUESTION}])
    task = Task(prompts=[ids], max_tokens=[4], seeds=[0], stop_ids=smol.tokenizer.stop_ids)
    res = run(smol.engine(), decode(catalog.resolve("cot", smol), task, smol.tokenizer,
                                    smol.config.max_position_embeddings))[0]
    assert len(res["branches"]) == 10 and len({b["tokens"][0] for b in res["branches"]}) == 10
    assert all(0 <= b["confidence"] <= 1 for b in res["branches"])
    assert res["answer"] == res["branches"][res["choice"]]["answer"]


@pytest.mark.slow
def test_cli_cot_json(cli_load_once, capsys):
    rc = main(["generate", QUESTION, "--sampler", "cot", "--branches", "4", "--max-tokens", "4", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and len(out["branches"]) == 4
    for b in out["branches"]:
        assert {"tokens", "text", "answer", "confidence"} <= set(b)
    assert out["text"] == out["branches"][out["choice"]]["text"]
