"""`python -m mqa_flax.gpu_program` where the gpu-aot extra is missing."""

import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# Not `gpu_program.available()`: importing the tool defines its flags, which
# would clash with decode.py's in the same test process.
_PLUGIN = importlib.util.find_spec('jax_plugins') is not None and importlib.util.find_spec(
    'jax_plugins.xla_cuda12') is not None


@pytest.mark.skipif(_PLUGIN, reason='the gpu-aot extra is here')
def test_without_the_extra_the_command_says_what_to_install():
  out = subprocess.run(
      [sys.executable, '-m', 'mqa_flax.gpu_program',
       '--config=configs/paper.py:mqa,tiny'],
      capture_output=True, text=True, cwd=ROOT, check=False)
  assert out.returncode == 2
  assert out.stderr.strip() == (
      "error: compiling for a GPU without one needs the CUDA plugin: "
      "pip install -e '.[gpu-aot]'")
