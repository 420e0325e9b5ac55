"""inference: length limits, source encoding, and translate's batching bookkeeping."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mqa_flax import inference
from mqa_flax import tokenizer as tokenizer_lib
from mqa_flax.config import ModelConfig
from mqa_flax.model import Transformer

_TEXTS = ['the cat sat on the mat', 'a dog ran to the cat', 'no cat is on a dog',
          'the mat is red and the dog is not', 'my bird will fly over your house',
          'we can see six green frogs in the quiet pond'] * 10
# Token lengths out of order, so that translate's sort by length permutes them;
# two blank lines, which must come back blank in place.
SENTENCES = ['the cat sat on the red mat', '', 'a dog', 'the mat is on a cat',
             '   ', 'cat']
DECODE = dict(beam_size=1, alpha=0.6, max_len_a=0.0, max_len_b=5, max_src_len=8)


@pytest.fixture(scope='module')
def tokenizer(tmp_path_factory):
  path = tmp_path_factory.mktemp('spm') / 'spm.model'
  return tokenizer_lib.train_tokenizer(_TEXTS, 32, str(path), max_sentences=1000, seed=0)


@pytest.fixture(scope='module')
def model(tokenizer):
  """A tiny random Transformer as (graphdef, params).

  Weights are drawn with numpy into the abstract model: jax.random compiles a
  program per shape, which costs seconds on a small CPU.
  """
  cfg = ModelConfig(vocab_size=tokenizer.vocab_size, num_encoder_layers=1,
                    num_decoder_layers=1, d_model=16, d_ff=32, num_heads=2,
                    num_kv_heads=1, head_dim=8, max_len=32, dropout_rate=0.0)
  graphdef, abstract = nnx.split(
      nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))), nnx.Param)
  rng = np.random.default_rng(0)

  def draw(path, x):
    keys = {str(getattr(k, 'key', k)) for k in path}
    if keys & {'scale', 'bias', 'bi', 'bo'}:  # Identity norms, zero biases.
      return jnp.full(x.shape, 'scale' in keys, x.dtype)
    # Strong cross-attention, so that each source gets its own output.
    scale = 3.0 if 'cross_attn' in keys else 1.0
    return jnp.asarray(rng.normal(size=x.shape) * scale, x.dtype)

  return graphdef, jax.tree_util.tree_map_with_path(draw, abstract)


def _translate(model, tokenizer, sentences, batch_size, **kw):
  graphdef, params = model
  return inference.translate(graphdef, params, tokenizer, sentences,
                             batch_size=batch_size, **(DECODE | kw))


def test_max_decode_len_is_clamped_to_model_length():
  assert inference.max_decode_len(10, 1.5, 2, 32) == 17
  assert inference.max_decode_len(40, 1.0, 10, 32) == 32
  assert inference.max_decode_len(0, 0.0, 0, 32) == 1
  assert inference.max_decode_len(3, 0.5, 1, 32) == 2  # int(2.5).


def test_encode_sources_appends_eos_and_truncates_keeping_it(tokenizer):
  short, long = 'a dog', 'the cat sat on the mat and the dog sat on the cat'
  eos = tokenizer.eos_id
  assert len(tokenizer.encode(long)) > 8
  ids, cut = inference.encode_sources(tokenizer, [short, long, long], 8, 'truncate')
  assert cut == 2
  assert ids[0] == tokenizer.encode(short) + [eos]
  assert ids[1] == ids[2] == tokenizer.encode(long)[:7] + [eos]


def test_encode_sources_overlong_error_names_the_line(tokenizer):
  long = 'the cat sat on the mat and the dog sat on the cat'
  n = len(tokenizer.encode(long)) + 1
  with pytest.raises(ValueError, match=f'input line 2 has {n} tokens, more than '
                     'max_eval_len=8'):
    inference.encode_sources(tokenizer, ['cat', long], 8, 'error')
  with pytest.raises(ValueError, match='input line 9 has'):
    inference.encode_sources(tokenizer, ['cat', long], 8, 'error', [7, 9])
  with pytest.raises(ValueError, match="overlong='drop'"):
    inference.encode_sources(tokenizer, ['cat'], 8, 'drop')


def test_translate_keeps_line_count_and_blank_lines(model, tokenizer):
  out = _translate(model, tokenizer, SENTENCES, batch_size=4)
  assert len(out) == len(SENTENCES)
  assert [i for i, o in enumerate(out) if not o] == [1, 4], out
  assert _translate(model, tokenizer, ['', ' \t'], batch_size=4) == ['', '']


def test_translate_equals_search_on_each_sentence_in_input_order(model, tokenizer):
  # translate sorts by length and batches; search here sees the input order.
  graphdef, params = model
  texts = [s for s in SENTENCES if s.strip()]
  ids, _ = inference.encode_sources(tokenizer, texts, 8, 'truncate')
  assert sorted(range(4), key=lambda i: len(ids[i])) != list(range(4))
  inputs = np.zeros((4, 8), np.int32)
  for row, x in enumerate(ids):
    inputs[row, :len(x)] = x
  tokens = inference.search(graphdef, params, inputs, beam_size=1, alpha=0.6,
                            eos_id=tokenizer.eos_id, max_len_a=0.0, max_len_b=5)
  want = [tokenizer.decode(row) for row in np.asarray(tokens)]
  assert len(set(want)) == 4, want  # Distinct, so a mix-up would show.
  assert _translate(model, tokenizer, texts, batch_size=4) == want


def test_translate_ignores_input_order_and_batch_size(model, tokenizer):
  out = _translate(model, tokenizer, SENTENCES, batch_size=4)
  perm = [3, 5, 1, 0, 4, 2]
  shuffled = _translate(model, tokenizer, [SENTENCES[i] for i in perm], batch_size=3)
  assert shuffled == [out[i] for i in perm]


def test_translate_refuses_lengths_that_allow_no_token(model, tokenizer):
  with pytest.raises(ValueError, match=r'max_len_a=-0.5, decode.max_len_b=5'):
    _translate(model, tokenizer, SENTENCES, batch_size=4, max_len_a=-0.5)
  with pytest.raises(ValueError, match=r'max_len_b=0: the output must allow'):
    _translate(model, tokenizer, SENTENCES, batch_size=4, max_len_b=0)
