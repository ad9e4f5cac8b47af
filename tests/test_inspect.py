"""The inspection API: attention probabilities, the residual stream, the logit lens and per-token likelihoods."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pangu_jax import Tokenizer, forward, load_checkpoint
from pangu_jax.assets import EMBEDDED_CHECKPOINT
from pangu_jax.inspect import inspect_forward, token_log_likelihoods, top_k
from pangu_jax.layouts import per_layer
from pangu_jax.model import PanguAlpha, hidden_states

TOKENS = np.array([[17, 4, 250, 9, 33, 801, 2, 64, 5, 120], [3, 3, 90, 14, 700, 61, 8, 8, 41, 999]], np.int32)
SEGMENTS = np.array([[0, 0, 0, 0, 1, 1, 1, 2, 2, 2], [0] * 10], np.int32)
PACKED_POSITIONS = np.array([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2], range(10)], np.int32)  # each document from 0


@pytest.fixture(scope="module")
def everything(tiny_fp32):
    config, params = tiny_fp32
    return inspect_forward(config, params, TOKENS, hidden=True, attention=True, lens=True)


def _layer_norm(x, scale, bias, epsilon):
    mean = x.mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(x.var(-1, keepdims=True) + epsilon) * scale + bias


def test_shapes_and_nothing_unasked(tiny_fp32, everything):
    config, params = tiny_fp32
    layers, batch, length = config.num_layers, *TOKENS.shape
    assert everything.logits.shape == (batch, length, config.vocab_size)
    assert everything.hidden.shape == (layers + 1, batch, length, config.hidden_size)
    assert everything.attention.shape == (layers, batch, config.num_heads, length, length)
    assert everything.lens.shape == (layers, batch, length, config.vocab_size)
    only_attention = inspect_forward(config, params, TOKENS, attention=True)
    assert only_attention.hidden is None and only_attention.lens is None
    nothing = inspect_forward(config, params, TOKENS)
    assert (nothing.hidden, nothing.attention, nothing.lens) == (None, None, None)


def test_inspection_on_or_off_gives_identical_logits(tiny_fp32, everything):
    config, params = tiny_fp32
    logits, _ = forward(config, params, TOKENS)
    np.testing.assert_array_equal(np.asarray(everything.logits), np.asarray(logits))
    np.testing.assert_array_equal(np.asarray(inspect_forward(config, params, TOKENS).logits), np.asarray(logits))


def test_attention_rows_sum_to_one_and_see_nothing_after_them(everything):
    weights = np.asarray(everything.attention)  # [L, B, N, T, T]
    np.testing.assert_allclose(weights.sum(-1), 1, rtol=0, atol=1e-5)
    after = np.triu(np.ones(TOKENS.shape[1:] * 2, bool), k=1)
    assert (weights[..., after] == 0).all()
    assert (weights[..., ~after] > 0).all()  # every earlier token gets some attention from a random model


def test_attention_stays_inside_each_document(tiny_fp32):
    config, params = tiny_fp32
    weights = np.asarray(inspect_forward(config, params, TOKENS, PACKED_POSITIONS, segment_ids=SEGMENTS,
                                         attention=True).attention)
    np.testing.assert_allclose(weights.sum(-1), 1, rtol=0, atol=1e-5)
    for row, segments in enumerate(SEGMENTS):
        other = segments[:, None] != segments[None, :]
        assert other.any() == (row == 0)
        assert (weights[:, row][..., other] == 0).all()
    document = slice(4, 7)  # the second document of row 0 attends as if it were alone
    alone = inspect_forward(config, params, TOKENS[:1, document], attention=True).attention
    np.testing.assert_allclose(weights[:, :1, :, document, document], np.asarray(alone), rtol=0, atol=1e-6)


def test_the_residual_stream_is_what_hidden_states_gives(tiny_fp32, everything):
    config, params = tiny_fp32
    stages = hidden_states(config, params, TOKENS)
    want = np.concatenate([np.asarray(stages["embeddings"])[None], np.asarray(stages["blocks"]),
                           np.asarray(stages["output"])[None]])
    np.testing.assert_allclose(np.asarray(everything.hidden), want, rtol=0, atol=1e-6)


def test_the_logit_lens_goes_through_the_final_layernorm_and_the_tied_head(tiny_fp32, everything):
    config, params = tiny_fp32
    lens, hidden = np.asarray(everything.lens), np.asarray(everything.hidden)
    head = np.asarray(params["word_embedding"])
    norm = {name: np.asarray(value) for name, value in params["final_ln"].items()}
    for layer in range(config.num_blocks):
        normed = _layer_norm(hidden[layer + 1], norm["scale"], norm["bias"], config.layer_norm_epsilon)
        np.testing.assert_allclose(lens[layer], normed @ head.T, rtol=0, atol=1e-4)
    np.testing.assert_allclose(lens[-1], hidden[-1] @ head.T, rtol=0, atol=1e-4)  # no LayerNorm after the top layer
    np.testing.assert_allclose(lens[-1], np.asarray(everything.logits), rtol=0, atol=1e-6)
    top_input = np.asarray(hidden_states(config, params, TOKENS)["top_input"])
    np.testing.assert_allclose(lens[-2], top_input @ head.T, rtol=0, atol=1e-4)


def test_per_layer_parameters_inspect_alike(tiny_fp32, everything):
    config, params = tiny_fp32
    again = inspect_forward(config, per_layer(params), TOKENS, hidden=True, attention=True, lens=True)
    for name in ("logits", "hidden", "attention", "lens"):
        np.testing.assert_allclose(np.asarray(getattr(again, name)), np.asarray(getattr(everything, name)),
                                   rtol=0, atol=1e-5)


def test_the_default_forward_computes_nothing_for_inspection(tiny_fp32, monkeypatch):
    """The model's jaxpr is the same with every `sow` removed: sowing costs an ordinary apply nothing."""
    config, params = tiny_fp32
    positions = jnp.broadcast_to(jnp.arange(TOKENS.shape[1]), TOKENS.shape)

    def model_jaxpr():
        apply = PanguAlpha(config.resolved()).apply
        return str(jax.make_jaxpr(lambda p, t: apply({"params": p}, t, positions))(params, TOKENS))

    sowing = model_jaxpr()
    monkeypatch.setattr(nn.Module, "sow", lambda self, *args, **kwargs: False)
    assert model_jaxpr() == sowing


def test_token_log_likelihoods_sum_to_the_sequence_log_likelihood(tiny_fp32):
    config, params = tiny_fp32
    ids = TOKENS[1]
    logits = np.asarray(forward(config, params, ids[None])[0][0], np.float64)
    log_probs = logits - logits.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    want = [log_probs[t - 1, ids[t]] for t in range(1, len(ids))]
    each = token_log_likelihoods(config, params, list(ids))
    assert each.shape == (len(ids) - 1,) and (each < 0).all()
    np.testing.assert_allclose(each.sum(), sum(want), rtol=1e-6)
    np.testing.assert_allclose(each, want, rtol=0, atol=1e-5)


def test_a_text_goes_through_the_tokenizer(vocab_path):
    config, params = load_checkpoint(EMBEDDED_CHECKPOINT)
    tokenizer = Tokenizer(vocab_path)
    text = "四川的省会是成都"
    np.testing.assert_array_equal(token_log_likelihoods(config, params, text, tokenizer),
                                  token_log_likelihoods(config, params, tokenizer.encode(text)))
    with pytest.raises(ValueError, match="needs a tokenizer"):
        token_log_likelihoods(config, params, text)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        token_log_likelihoods(config, params, [5])


def test_top_k_gives_the_likeliest_tokens_with_their_text(tiny_fp32, everything, vocab_path):
    tokenizer = Tokenizer(vocab_path)
    row = np.asarray(everything.lens[1, 0, -1])
    found = top_k(row, tokenizer, k=5)
    probabilities = np.exp(row - row.max()) / np.exp(row - row.max()).sum()
    assert [p.token_id for p in found] == list(np.argsort(-probabilities)[:5])
    np.testing.assert_allclose([p.probability for p in found], np.sort(probabilities)[::-1][:5], rtol=1e-6)
    assert [p.text for p in found] == [tokenizer.decode([p.token_id]) for p in found]
    with pytest.raises(ValueError, match="one row of logits"):
        top_k(np.asarray(everything.logits), tokenizer)


def test_bad_inputs_are_refused(tiny_fp32):
    config, params = tiny_fp32
    with pytest.raises(ValueError, match=r"tokens must be \[batch, length\]"):
        inspect_forward(config, params, TOKENS[0], attention=True)
    with pytest.raises(ValueError, match="segment_ids shape"):
        inspect_forward(config, params, TOKENS, segment_ids=SEGMENTS[:1], attention=True)
