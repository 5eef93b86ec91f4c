"""The incremental detokeniser against the tokenizer's own full decode (SmolLM2's real tokenizer)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cold.sampling.detokenize import TextTracker

TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=60)


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    return smollm2.tokenizer


def _streamed(tracker: TextTracker, ids: list[int]) -> str:
    return "".join(tracker.add(i) for i in ids) + tracker.flush()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXT)
def test_streamed_text_equals_the_full_decode(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False).input_ids
    full = tokenizer.decode(ids, skip_special_tokens=True)
    tracker = TextTracker(tokenizer)
    assert _streamed(tracker, ids) == full
    assert tracker.text == full


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXT, stop=st.text(alphabet="ab é\n", min_size=1, max_size=3))
def test_streamed_text_stops_where_the_full_decode_first_holds_the_stop_string(tokenizer, text, stop):
    ids = tokenizer(text, add_special_tokens=False).input_ids
    full = tokenizer.decode(ids, skip_special_tokens=True)
    tracker = TextTracker(tokenizer, (stop,))
    streamed = _streamed(tracker, ids)
    cut = full.find(stop)
    assert streamed == (full if cut < 0 else full[:cut])
    assert tracker.stopped == (cut >= 0)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=st.lists(st.integers(0, 49151), max_size=40))
def test_any_ids_stream_to_the_full_decode(tokenizer, ids):
    """Byte tokens that never complete a character, special tokens: still the full decode at the end."""
    assert _streamed(TextTracker(tokenizer), ids) == tokenizer.decode(ids, skip_special_tokens=True)


def test_each_token_decodes_a_short_window_not_the_whole_sequence(tokenizer):
    decoded = []

    class Counting:
        def decode(self, ids, **kwargs):
            decoded.append(len(ids))
            return tokenizer.decode(ids, **kwargs)

    ids = tokenizer(" the quick brown fox jumps over the lazy dog." * 60, add_special_tokens=False).input_ids
    tracker = TextTracker(Counting(), ("never appears",))
    _streamed(tracker, ids)
    assert len(ids) > 500
    assert max(decoded) <= 4  # a window of a few ids per token: linear in the length, not quadratic


def test_a_forked_tracker_goes_on_independently(tokenizer):
    ids = tokenizer("Hello world, again", add_special_tokens=False).input_ids
    tracker = TextTracker(tokenizer)
    for i in ids[:2]:
        tracker.add(i)
    fork = tracker.fork()
    rest_a = _streamed(tracker, ids[2:])
    rest_b = _streamed(fork, ids[2:3])
    assert tracker.text == tokenizer.decode(ids, skip_special_tokens=True)
    assert fork.text == tokenizer.decode(ids[:3], skip_special_tokens=True)
    assert rest_a.startswith(rest_b)
