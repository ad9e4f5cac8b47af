"""generate(): greedy against the reference, batching, sampling and prompt errors."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from pangu_jax import Sampler, forward, generate
from pangu_jax.decoding import CHUNK, Generation, start, stream
from tests.conftest import compiled_programs, load_json

GREEDY = load_json("expected_greedy.json")["results"]


def test_greedy_continuations_equal_the_reference(tiny_fp32):
    config, params = tiny_fp32
    prompts = [case["prompt"] for case in GREEDY]
    out = generate(config, params, prompts, 10, temperature=0, stop_ids=())
    assert out == [case["new_tokens"] for case in GREEDY]


def test_a_batch_of_mixed_lengths_equals_each_prompt_alone(tiny_fp32):
    config, params = tiny_fp32
    rng = np.random.default_rng(0)
    prompts = [rng.integers(10, 1000, n).tolist() for n in (1, 7, 12, 20, 3)]
    together = generate(config, params, prompts, 12, temperature=0, stop_ids=())
    assert together == [generate(config, params, [p], 12, temperature=0, stop_ids=())[0] for p in prompts]


def test_cached_generation_equals_teacher_forced_argmax(tiny_fp32):
    config, params = tiny_fp32
    prompt = [47, 320, 155]
    new = generate(config, params, [prompt], 15, temperature=0, stop_ids=())[0]
    logits, _ = forward(config, params, jnp.asarray([prompt + new]))
    assert np.argmax(np.asarray(logits[0, len(prompt) - 1 : -1]), axis=-1).tolist() == new


def test_rows_stop_on_their_own_stop_token(tiny_fp32):
    config, params = tiny_fp32
    first, second = (case["prompt"] for case in GREEDY)
    # The second row's greedy path is 200 forever; stopping on 98 ends only the first row.
    out = generate(config, params, [first, second], 10, temperature=0, stop_ids=(98,))
    assert out == [GREEDY[0]["new_tokens"][:2], GREEDY[1]["new_tokens"]]


def test_generation_stops_at_the_last_position(tiny_fp32):
    config, params = tiny_fp32
    prompt = list(range(10, 10 + config.max_positions - 3))
    assert len(generate(config, params, [prompt], 50, temperature=0, stop_ids=())[0]) == 3


def test_sampling_is_seeded_and_top_k_keeps_to_the_top_tokens(tiny_fp32):
    config, params = tiny_fp32
    prompt = GREEDY[0]["prompt"]
    a = generate(config, params, [prompt], 10, top_k=5, seed=1, stop_ids=())
    assert a == generate(config, params, [prompt], 10, top_k=5, seed=1, stop_ids=())
    assert a != generate(config, params, [prompt], 10, top_k=5, seed=2, stop_ids=())
    assert generate(config, params, [prompt], 10, top_k=1, seed=3, stop_ids=()) == [GREEDY[0]["new_tokens"]]


def test_sampler_filters():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    keys = [jnp.asarray(np.random.default_rng(i).integers(0, 2**31, 2), jnp.uint32) for i in range(200)]
    draws = {int(Sampler(top_p=0.7)(logits, k)[0]) for k in keys}
    assert draws == {0, 1}  # 0.5 < 0.7, so the second token is needed too; no more
    assert {int(Sampler(top_k=3, temperature=2.0)(logits, k)[0]) for k in keys} == {0, 1, 2}
    assert int(Sampler(temperature=0)(logits, keys[0])[0]) == 0


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-1), "temperature must be >= 0"),
    (dict(top_k=-2), "top_k must be an integer >= 0"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
])
def test_bad_sampler_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Sampler(**kwargs)


@pytest.mark.parametrize("prompts, message", [
    ([[]], "prompt 0 is empty"),
    ([[5], []], "prompt 1 is empty"),
    ([], "non-empty list"),
    ([list(range(128))], "prompt 0 has 128 tokens; the model has 128 positions"),
    ([[5, 1000]], r"token id\(s\) \[1000\] outside \[0, 1000\)"),
    ([[-1]], r"token id\(s\) \[-1\]"),
])
def test_bad_prompts_are_refused_with_a_clear_message(tiny_fp32, prompts, message):
    config, params = tiny_fp32
    with pytest.raises(ValueError, match=message):
        generate(config, params, prompts, 5)


def test_bad_max_new_tokens(tiny_fp32):
    with pytest.raises(ValueError, match="max_new_tokens must be a positive integer"):
        generate(*tiny_fp32, [[5]], 0)


def _penalised_greedy(config, params, prompt, steps, penalty):
    """Teacher-forced reference: full forward per step, CTRL-style penalty in NumPy."""
    seq, seen = list(prompt), set(prompt)
    for _ in range(steps):
        logits = np.array(forward(config, params, jnp.asarray([seq]))[0][0, -1])
        for t in seen:
            logits[t] = logits[t] / penalty if logits[t] > 0 else logits[t] * penalty
        token = int(np.argmax(logits))
        seq.append(token)
        seen.add(token)
    return seq[len(prompt):]


@pytest.mark.slow
def test_repetition_penalty_matches_a_step_by_step_reference(tiny_fp32):
    config, params = tiny_fp32
    prompts = [GREEDY[1]["prompt"], GREEDY[0]["prompt"][:3]]
    out = generate(config, params, prompts, 10, temperature=0, repetition_penalty=1.8, stop_ids=())
    assert out == [_penalised_greedy(config, params, p, 10, 1.8) for p in prompts]
    assert out[0] != GREEDY[1]["new_tokens"]  # the plain greedy path repeats token 200; the penalty breaks it


@pytest.mark.slow
def test_each_row_samples_with_its_own_seed(tiny_fp32):
    config, params = tiny_fp32
    rng = np.random.default_rng(1)
    prompts = [rng.integers(10, 1000, n).tolist() for n in (2, 9, 5)]
    seeds = [11, 12, 13]
    kwargs = dict(temperature=1.3, top_k=0, top_p=0.95, stop_ids=())
    together = generate(config, params, prompts, 12, seed=seeds, **kwargs)
    assert together == [generate(config, params, [p], 12, seed=s, **kwargs)[0] for p, s in zip(prompts, seeds)]
    with pytest.raises(ValueError, match="got 2 seeds for 3 prompts"):
        generate(config, params, prompts, 4, seed=[1, 2])


@pytest.mark.parametrize("count", [pytest.param(40, marks=pytest.mark.slow), 5, pytest.param(17, marks=pytest.mark.slow)])  # several chunks; one, longer than needed; one, just enough
def test_streaming_hands_out_the_same_tokens_chunk_by_chunk(tiny_fp32, count):
    config, params = tiny_fp32
    prompts = [GREEDY[0]["prompt"], GREEDY[1]["prompt"][:2]]
    kwargs = dict(top_k=5, seed=[3, 4], stop_ids=(98,))
    chunks = list(stream(config, params, prompts, count, **kwargs))
    assert len(chunks) == 1 + -(-(count - 1) // CHUNK)  # the first token, then each chunk
    joined = [sum((c[row] for c in chunks), []) for row in range(2)]
    assert joined == generate(config, params, prompts, count, **kwargs)


@pytest.mark.parametrize("counts, steps", [((20, 50), 50), ((3, 9), 9)])
def test_decoding_runs_no_step_past_the_rows_limits(tiny_fp32, counts, steps):
    """Rows with limits of 20 and 50 new tokens (or 3 and 9) take 50 (9) steps, not a whole last chunk more."""
    config, params = tiny_fp32
    near_end = [5] * (config.max_positions - counts[0])  # room for counts[0] new tokens only
    run = start(config, params, [near_end, [5, 6, 7]], counts[1], temperature=0, stop_ids=())
    run.decode(to_end=True)
    assert int(run.state.step) == steps
    assert [len(row) for row in run.tokens()] == list(counts)


@pytest.mark.parametrize("counts, first", [((5,), 5), pytest.param((20, 3), 1 + 16, marks=pytest.mark.slow)])
def test_a_stream_chunk_stops_when_every_row_is_done(tiny_fp32, counts, first):
    """After the prefill's token, a chunk runs at most CHUNK steps and stops when every row is done (the
    step counter reads `first` after one chunk): the last runs only the steps left, a chunk after it none."""
    config, params = tiny_fp32
    near_end = [5] * (config.max_positions - counts[-1])  # room for counts[-1] new tokens only
    prompts = [[5, 6, 7], near_end][: len(counts)]
    run = start(config, params, prompts, counts[0], temperature=0, stop_ids=())
    steps = []
    for _ in range(3):
        run.decode(to_end=False)
        steps.append(int(run.state.step))
    assert CHUNK == 16 and steps == [first, max(counts), max(counts)]
    assert run.tokens() == generate(config, params, prompts, counts[0], temperature=0, stop_ids=())


def test_generate_hands_the_decode_to_the_device_without_reading_the_prefill_first(tiny_fp32, monkeypatch):
    config, params = tiny_fp32
    events = []
    decode, finished = Generation.decode, Generation.finished
    monkeypatch.setattr(Generation, "decode", lambda run, to_end: (events.append("decode"), decode(run, to_end))[1])
    monkeypatch.setattr(Generation, "finished", lambda run, *a: (events.append("read"), finished(run, *a))[1])
    prompt = [GREEDY[0]["prompt"]]
    assert generate(config, params, prompt, 6, temperature=0, stop_ids=())[0] == GREEDY[0]["new_tokens"][:6]
    assert events == ["decode"]
    events.clear()  # one new token, the prefill's: nothing to decode
    assert generate(config, params, prompt, 1, temperature=0, stop_ids=())[0] == GREEDY[0]["new_tokens"][:1]
    assert events == []
    # Every row stopped at the prefill's token: the device finds nothing to do.
    assert generate(config, params, prompt, 6, temperature=0, stop_ids=(GREEDY[0]["new_tokens"][0],)) == [[]]


def test_streaming_dispatches_each_chunk_before_handing_out_the_last(tiny_fp32, monkeypatch):
    config, params = tiny_fp32
    events = []
    decode = Generation.decode
    monkeypatch.setattr(Generation, "decode", lambda run, to_end: (events.append("decode"), decode(run, to_end))[1])
    for _ in stream(config, params, [GREEDY[0]["prompt"]], 40, temperature=0, stop_ids=()):
        events.append("yield")
    # The prefill's token is handed out before a decode program is needed;
    # after it the device works on the next chunk while the caller holds the
    # tokens of the last one, and nothing is dispatched after the last chunk.
    decodes = events.count("decode")
    assert events == ["yield", "decode"] + ["decode", "yield"] * (decodes - 1) + ["yield"]
    assert decodes > 1
    # One new token is the prefill's: no decode at all.
    events.clear()
    for _ in stream(config, params, [GREEDY[0]["prompt"]], 1, temperature=0, stop_ids=()):
        events.append("yield")
    assert events == ["yield"]


@pytest.mark.parametrize("counts", [(20, 30), (2, 5, 9, 16)])  # room for 64 new tokens; for 32
def test_another_token_count_in_the_same_bucket_reuses_the_compiled_programs(tiny_fp32, counts):
    config, params = tiny_fp32
    prompt = [GREEDY[0]["prompt"]]

    def joined(count: int) -> list[int]:
        return sum((chunk[0] for chunk in stream(config, params, prompt, count, temperature=0, stop_ids=())), [])

    first = generate(config, params, prompt, counts[0], temperature=0, stop_ids=())
    assert joined(counts[0]) == first[0]
    with compiled_programs() as compiled:
        for count in counts[1:]:
            more = generate(config, params, prompt, count, temperature=0, stop_ids=())
            assert len(more[0]) == count and more[0][:counts[0]] == first[0]
            assert joined(count) == more[0]
    assert compiled == []


def test_repetition_penalty_must_be_positive():
    with pytest.raises(ValueError, match=r"repetition_penalty must be > 0 \(1 switches it off\), got 0"):
        Sampler(repetition_penalty=0)
