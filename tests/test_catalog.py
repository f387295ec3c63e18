"""The sampler catalogue: one table of names, defaults, options, strategies and needs."""

from __future__ import annotations

import pytest

from entropix import EntropixError
from entropix.cli import build_parser
from entropix.sampler import catalog
from entropix.sampler.config import SamplingParams
from entropix.sampler.policy import Entropix, Greedy, Ranked, Sample

from tinymodel import tiny_lm


def test_names_aliases_and_unknown():
    assert {"greedy", "sample", "entropix", "entropix-branching", "cot", "cot-agg", "self-consistency"} <= set(
        catalog.names())
    assert catalog.spec("argmax").name == "greedy" and catalog.spec(" SC ").name == "self-consistency"
    with pytest.raises(EntropixError, match="unknown sampler 'beam'.*known: greedy"):
        catalog.spec("beam")
    assert catalog.names(listed_only=True) == ["greedy", "sample", "entropix", "cot", "self-consistency", "deepconf",
                                              "sc-early", "auto", "dslider", "lookahead"]


def test_default_names_for_the_cli_and_for_openai():
    assert catalog.default_name(None, False) == "greedy"  # the CLI decodes greedily unless asked
    assert catalog.default_name(None, True) == "sample"  # a filter means sampling
    assert catalog.default_name(0.8, False) == "sample"
    assert catalog.default_name(0, True) == "greedy"
    assert catalog.default_name(None, False, openai=True) == "sample"  # OpenAI samples at T=1 by default
    assert catalog.default_name(0.0, False, openai=True) == "greedy"


def test_decoders_carry_policy_strategy_and_rows():
    lm = tiny_lm()
    d = catalog.resolve("sample", lm, temperature=0.5, top_k=3)
    assert d.policy == Sample(SamplingParams(temperature=0.5, top_k=3)) and d.strategy == "single"
    assert catalog.resolve("sample", lm, temperature=0).policy == Greedy()  # T=0 is the argmax
    assert catalog.resolve("self-consistency", lm).policy == Sample(SamplingParams(temperature=0.7))
    cot = catalog.resolve("cot", lm, branches=4)
    assert isinstance(cot.policy, Ranked) and cot.rows_per_prompt == 4 and cot.params["aggregate"] is False
    assert catalog.resolve("cot-agg", lm).params == {"branches": 10, "aggregate": True}
    ent = catalog.resolve("entropix", lm, temperature=0.9)
    assert isinstance(ent.policy, Entropix) and ent.policy.config.temperature == 0.9
    assert ent.capture_layers == ent.policy.config.attention_layers and ent.spec.needs_attention
    assert set(ent.thresholds()) == set(catalog.THRESHOLD_KEYS) and cot.thresholds() is None
    br = catalog.resolve("entropix-branching", lm)
    assert br.branching is not None and br.rows_per_prompt == br.branching.max_rows // 4
    # equal configurations make equal policies: their rows are sampled in one call
    assert catalog.resolve("entropix", lm).policy == catalog.resolve("entropix", lm).policy


def test_parameters_merge_defaults_and_check_values():
    assert catalog.parameters("self-consistency", samples=8) == {"samples": 8, "temperature": 0.7}
    assert catalog.parameters("greedy", temperature=0.7) == {}  # ignored unless strict
    with pytest.raises(EntropixError, match="--samples does not apply to sampler 'greedy'"):
        catalog.parameters("greedy", strict=True, samples=3)
    for bad, msg in (({"branches": 0}, "--branches"), ({"branches": 65}, "--branches"), ({"top_p": 2.0}, "top_p")):
        with pytest.raises(EntropixError, match=msg):
            catalog.parameters("cot" if "branches" in bad else "sample", **bad)
    with pytest.raises(EntropixError, match="sampler config file not found"):
        catalog.parameters("entropix", sampler_config="/no/such.json")
    with pytest.raises(EntropixError, match="base temperature above 0"):
        catalog.resolve("entropix", tiny_lm(), temperature=0)


def test_front_ends_list_the_catalogue():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "cmd").choices
    eval_help = sub["eval"].format_help()
    assert all(s.name in eval_help for s in catalog.SPECS)
    gen_help = sub["generate"].format_help()
    assert "--backend" in gen_help and "--backend" in sub["serve"].format_help()
