"""`Options` in four parts: every flag lives in exactly one, parsing fills them, and a change by flag name touches
only its part."""

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from train.options import (CAUSAL_LM, CLASSIFY, FLAG_FIELDS, PARTS, SWEEP, Options, Parser, add_options, from_args)


def test_every_field_of_every_part_is_one_flag():
    fields = [(part, field.name) for part, cls in PARTS.items() for field in dataclasses.fields(cls)]
    assert len(fields) == len(FLAG_FIELDS) == len(set(FLAG_FIELDS))
    assert sorted((part, field.name) for part, field in FLAG_FIELDS.values()) == sorted(fields)
    assert {field.name for field in dataclasses.fields(Options)} == set(PARTS)


@pytest.mark.parametrize("command", [CLASSIFY, CAUSAL_LM, SWEEP])
def test_a_commands_flags_parse_into_their_parts(command):
    parser = Parser()
    add_options(parser, command)
    dests = {action.dest for action in parser._actions if action.dest != "help"}
    assert dests <= set(FLAG_FIELDS)
    args = parser.parse_args(["--batch-size", "16", "--model", "somewhere", "--dataset", "rows.csv"])
    options = from_args(args)
    assert (options.optim.batch_size, options.model.name, options.data.dataset) == (16, "somewhere", "rows.csv")
    assert options.run == Options().run  # untouched parts keep their defaults


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(sorted(FLAG_FIELDS)))
def test_replace_by_flag_changes_that_flag_only(dest):
    """A sentinel value set by flag name comes back by flag name, and every other flag keeps its value."""
    sentinel = object()
    before = Options()
    after = before.replace(**{dest: sentinel})
    assert after.get(dest) is sentinel
    part = FLAG_FIELDS[dest][0]
    assert all(getattr(after, other) == getattr(before, other) for other in PARTS if other != part)
    assert {k: v for k, v in after.flat().items() if k != dest} == {k: v for k, v in before.flat().items()
                                                                     if k != dest}


def test_an_unknown_flag_name_is_refused():
    with pytest.raises(KeyError):
        Options().replace(batchsize=8)
