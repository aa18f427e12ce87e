"""The toy model behind the emulator: tokenizer round trips, distributions, variants."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from klstream.emulator.toymodel import (
    EOS_ID,
    MASKED_LOGPROB,
    TOKEN_IDS,
    VOCAB,
    VOCAB_SIZE,
    ToyModel,
    UnknownModelError,
    decode,
    encode,
    token_str,
    top_k,
)

BASE = ToyModel.for_name("toy")
PROMPTS = ["What is the capital of France?", "Tell me a story.", "", "Ünïcødé ☃ prompt"]


def _reference_greedy(text: str) -> list[int]:
    """Greedy longest match, written the slow obvious way."""
    longest = max(len(t) for t in VOCAB)
    ids, pos = [], 0
    while pos < len(text):
        for size in range(min(longest, len(text) - pos), 0, -1):
            if text[pos : pos + size] in TOKEN_IDS:
                ids.append(TOKEN_IDS[text[pos : pos + size]])
                pos += size
                break
        else:
            ids.append(VOCAB_SIZE + ord(text[pos]))
            pos += 1
    return ids


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    return float(np.sum(np.exp(p) * (p - q)))


def _contexts(n: int) -> list[tuple[str, list[int]]]:
    """Prompts and prefixes of the model's own samples: the contexts klstream scores."""
    out = []
    for i in range(n):
        prompt = f"question {i % 7}"
        ids = BASE.sample(prompt, 1 + i % 13, 1.0, seed=i).token_ids
        out.append((prompt, ids[: i % (len(ids) + 1)]))
    return out


def test_vocabulary_is_prefix_closed_with_an_empty_eos() -> None:
    assert VOCAB[EOS_ID] == ""
    assert 300 <= VOCAB_SIZE <= 2000
    assert len(set(VOCAB)) == VOCAB_SIZE
    assert all(tok[:i] in TOKEN_IDS for tok in VOCAB[1:] for i in range(1, len(tok)))
    assert {"\n", " the", "the", ".", "é"} <= set(VOCAB)


@given(st.text())
def test_any_text_round_trips(text: str) -> None:
    ids = encode(text)
    assert decode(ids) == text
    assert "".join(token_str(i) for i in ids) == text


@given(st.text(alphabet=st.sampled_from([*"the re th ca,.\n", "☃", "ü"])))
def test_encode_is_greedy_longest_match(text: str) -> None:
    assert encode(text) == _reference_greedy(text)


def test_unknown_characters_use_fallback_ids() -> None:
    ids = encode("a☃")
    assert ids == [TOKEN_IDS["a"], VOCAB_SIZE + ord("☃")]
    with pytest.raises(ValueError):
        token_str(-1)


def test_a_sequence_the_model_forbids_would_not_round_trip() -> None:
    """Why the model masks tokens: " th" + "e" reads back as " the"."""
    ids = [TOKEN_IDS[" th"], TOKEN_IDS["e"]]
    assert encode(decode(ids)) == [TOKEN_IDS[" the"]]
    lp = BASE.next_token_logprobs("p", [TOKEN_IDS[" th"]])
    assert lp[TOKEN_IDS["e"]] == MASKED_LOGPROB
    assert np.exp(lp[TOKEN_IDS["e"]]) == 0.0


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_sequences_of_allowed_tokens_round_trip(data: st.DataObject) -> None:
    prompt = data.draw(st.sampled_from(PROMPTS))
    ids: list[int] = []
    for _ in range(data.draw(st.integers(1, 25))):
        allowed = np.flatnonzero(BASE.next_token_logprobs(prompt, ids) > MASKED_LOGPROB)
        choice = int(allowed[data.draw(st.integers(0, len(allowed) - 1))])
        if choice != EOS_ID:
            ids.append(choice)
    assert encode(decode(ids)) == ids


@settings(max_examples=40, deadline=None)
@given(
    prompt=st.text(max_size=30),
    seed=st.integers(0, 2**32),
    temperature=st.sampled_from([0.0, 0.5, 1.0, 2.0]),
    name=st.sampled_from(["toy", "toy-d0.5", "toy-d2-s3"]),
)
def test_sampled_outputs_retokenize_to_the_same_ids(
    prompt: str, seed: int, temperature: float, name: str
) -> None:
    gen = ToyModel.for_name(name).sample(prompt, 40, temperature, seed)
    assert encode(gen.text) == gen.token_ids
    assert "".join(step.chosen.token for step in gen.steps) == gen.text


@pytest.mark.parametrize("prompt", PROMPTS)
def test_distribution_is_a_normalised_float64_vector(prompt: str) -> None:
    for ids in ([], encode("The capital"), encode("a ☃")):
        lp = BASE.next_token_logprobs(prompt, ids)
        assert lp.dtype == np.float64
        assert lp.shape == (VOCAB_SIZE,)
        assert abs(np.logaddexp.reduce(lp)) < 1e-12
        assert np.all(np.isfinite(lp))


def test_distribution_is_deterministic_and_depends_on_prompt_and_context() -> None:
    fresh = ToyModel("toy")
    ids = encode("The capital of")
    assert np.array_equal(fresh.next_token_logprobs("q", ids), BASE.next_token_logprobs("q", ids))
    assert not np.array_equal(
        BASE.next_token_logprobs("q", ids), BASE.next_token_logprobs("r", ids)
    )
    assert not np.array_equal(
        BASE.next_token_logprobs("q", ids), BASE.next_token_logprobs("q", ids[:-1])
    )


def test_entropies_have_a_realistic_spread() -> None:
    entropies = []
    for prompt, ids in _contexts(400):
        lp = BASE.next_token_logprobs(prompt, ids)
        entropies.append(-float(np.sum(np.exp(lp) * lp)))
    assert min(entropies) < 0.1
    assert max(entropies) > 2.5
    assert 0.2 < float(np.median(entropies)) < 2.5


@pytest.mark.parametrize(
    ("name", "dial", "seed", "flags"),
    [
        ("toy", 0.0, 0, set()),
        ("models/toy-d0.5", 0.5, 0, set()),
        ("gemini-toy-d0.25", 0.25, 0, set()),
        ("toy-d2-s3-thinking", 2.0, 3, {"thinking"}),
        ("toy-noprefill-nologprobs", 0.0, 0, {"noprefill", "nologprobs"}),
    ],
)
def test_names_select_variants(name: str, dial: float, seed: int, flags: set[str]) -> None:
    model = ToyModel.for_name(name)
    assert (model.dial, model.perturb_seed) == (dial, seed)
    assert {f for f in ("thinking", "noprefill", "nologprobs") if getattr(model, f)} == flags


@pytest.mark.parametrize("name", ["gemini-2.5-flash", "toys", "gpt-4", ""])
def test_unknown_families_are_rejected(name: str) -> None:
    with pytest.raises(UnknownModelError):
        ToyModel.for_name(name)


def test_same_distribution_gives_kl_zero() -> None:
    for other in ("toy", "gemini-toy", "toy-thinking", "toy-d0"):
        model = ToyModel.for_name(other)
        for prompt, ids in _contexts(30):
            p = BASE.next_token_logprobs(prompt, ids)
            assert _kl(p, model.next_token_logprobs(prompt, ids)) == 0.0


def test_divergence_dial_is_monotone() -> None:
    dials = [0.0, 0.25, 0.5, 1.0, 2.0]
    models = [ToyModel.for_name(f"toy-d{d}") for d in dials]
    per_context = np.array(
        [
            [_kl(BASE.next_token_logprobs(p, ids), m.next_token_logprobs(p, ids)) for m in models]
            for p, ids in _contexts(200)
        ]
    )
    means = per_context.mean(axis=0)
    assert means[0] == 0.0
    assert np.all(np.diff(means) > 0), means
    assert np.all(np.diff(per_context, axis=1) >= -1e-12)
    assert 0.2 < means[3] < 2.0  # d=1 is a clearly visible but not absurd divergence


def test_perturbation_seed_changes_the_direction() -> None:
    ids = encode("The")
    a = ToyModel.for_name("toy-d1").next_token_logprobs("q", ids)
    b = ToyModel.for_name("toy-d1-s1").next_token_logprobs("q", ids)
    assert _kl(a, b) > 0.0


def test_top_k_is_sorted_and_exact() -> None:
    lp = BASE.next_token_logprobs("q", encode("The"))
    best = top_k(lp, 20)
    order = np.argsort(-lp, kind="stable")[:20]
    assert [c.token_id for c in best] == order.tolist()
    assert [c.logprob for c in best] == lp[order].tolist()
    assert [c.token for c in best] == [VOCAB[i] for i in order]
    assert top_k(lp, 0) == []
    assert len(top_k(lp, VOCAB_SIZE + 5)) == VOCAB_SIZE


def test_sample_reports_the_models_logprobs_and_top_k() -> None:
    prompt = "Tell me a story."
    gen = BASE.sample(prompt, 30, temperature=1.3, seed=5, top_k_logprobs=4)
    context: list[int] = []
    for step in gen.steps:
        lp = BASE.next_token_logprobs(prompt, context)
        assert step.chosen.logprob == lp[step.chosen.token_id]
        assert step.top == top_k(lp, 4)
        context.append(step.chosen.token_id)
    assert (gen.finish_reason == "STOP") == (gen.steps[-1].chosen.token_id == EOS_ID)
    assert len(gen.steps) <= 30


def test_temperature_zero_is_greedy() -> None:
    gen = BASE.sample("q", 20, temperature=0.0, seed=None, top_k_logprobs=1)
    assert all(step.chosen == step.top[0] for step in gen.steps)


def test_seed_makes_sampling_reproducible() -> None:
    runs = {BASE.sample("q", 25, 1.0, seed=s).text for s in range(5)}
    assert BASE.sample("q", 25, 1.0, seed=3).text == BASE.sample("q", 25, 1.0, seed=3).text
    assert len(runs) > 1


def test_sample_continues_after_a_prefill() -> None:
    prefill = encode("The capital of France is")
    gen = BASE.sample("q", 5, 0.0, prefill_ids=prefill)
    lp = BASE.next_token_logprobs("q", prefill)
    assert gen.steps[0].chosen.token_id == int(np.argmax(lp))
    assert encode(decode(prefill) + gen.text) == prefill + gen.token_ids
