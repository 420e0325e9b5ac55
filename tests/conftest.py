"""Test setup: 8 fake CPU devices (for the mesh tests), strict rank promotion,
and a compilation cache that the tests (and their subprocesses) share."""

import os
import sys
import tempfile

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# Many tests train and decode the same tiny models, in and out of process.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR',
                      os.path.join(tempfile.gettempdir(), 'mqa_flax_tests_jax_cache'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

jax.config.update('jax_numpy_rank_promotion', 'raise')


def make_examples(src: list[list[int]], tgt: list[list[int]]):
  """`data.Examples` from ragged lists of ids (EOS already included)."""
  from mqa_flax import data  # pylint: disable=g-import-not-at-top

  def flat(seqs):
    offsets = np.zeros(len(seqs) + 1, np.int64)
    np.cumsum([len(s) for s in seqs], out=offsets[1:])
    return np.fromiter((t for s in seqs for t in s), np.int32, count=int(offsets[-1])), offsets

  assert len(src) == len(tgt)
  return data.Examples(*flat(src), *flat(tgt))



def cudnn_on_cpu(monkeypatch, masks: bool = True) -> list:
  """Lets attention impl 'cudnn' run on the CPU: its `jax.nn.dot_product_attention`
  call, with the same arguments, runs jax's XLA version of it (without its
  mask where `masks` is False: a broken kernel). Returns the shapes of the
  queries and keys it is given."""
  from mqa_flax import attention  # pylint: disable=g-import-not-at-top
  real, shapes = jax.nn.dot_product_attention, []

  def xla_instead(query, key, *args, implementation=None, mask=None, **kwargs):
    assert implementation == 'cudnn'
    shapes.append((query.shape, key.shape))
    return real(query, key, *args, mask=mask if masks else None, implementation='xla',
                **kwargs)

  monkeypatch.setattr(jax.nn, 'dot_product_attention', xla_instead)
  monkeypatch.setattr(attention, 'for_gpu', lambda: True)
  return shapes


def randomize_layer_norm(ln, key, spread: float = 0.2):
  """Gives flax LayerNorm `ln` a random scale (around 1) and bias (around 0):
  at their initial 1 and 0 a folded LayerNorm would be right whatever it did
  with them. Returns ln."""
  ks, kb = jax.random.split(key)
  ln.scale[...] = 1 + spread * jax.random.normal(ks, ln.scale.shape)
  ln.bias[...] = spread * jax.random.normal(kb, ln.bias.shape)
  return ln
