"""`python -m mqa_flax.gpu_program` where the gpu-aot extra is missing."""

import os
import subprocess
import sys

import pytest

from mqa_flax import gpu_program

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(gpu_program.available(), reason='the gpu-aot extra is here')
def test_without_the_extra_the_command_says_what_to_install():
  out = subprocess.run(
      [sys.executable, '-m', 'mqa_flax.gpu_program',
       '--config=configs/paper.py:mqa,tiny'],
      capture_output=True, text=True, cwd=ROOT, check=False)
  assert out.returncode == 2
  assert out.stderr.strip() == (
      "error: compiling for a GPU without one needs the CUDA plugin: "
      "pip install -e '.[gpu-aot]'")
