"""files.py: a failed write leaves the old file; locked updates keep each other."""

import errno
import json
import os
import threading

import pytest

from mqa_flax import errors
from mqa_flax import files


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
  path = str(tmp_path / 'a.json')
  files.write_json(path, {'old': 1})
  with pytest.raises(OSError):
    with files.atomic_write(path) as f:
      f.write('{"new": ')
      raise OSError(errno.ENOSPC, 'No space left on device')
  assert json.load(open(path)) == {'old': 1}
  assert os.listdir(tmp_path) == ['a.json']


def test_invalid_json_is_one_user_error_naming_the_file(tmp_path):
  path = tmp_path / 'config.json'
  path.write_text('{"model": {"d_model": 3')
  with pytest.raises(errors.UserError, match=r'config\.json is not valid JSON .*: fix it'):
    files.read_json(str(path), 'fix it')
  path.write_bytes(b'\xff\xfe')
  with pytest.raises(errors.UserError, match='not valid JSON'):
    files.read_json(str(path))


def test_locked_updates_keep_every_entry(tmp_path):
  path = str(tmp_path / 'table.json')

  def add(key):
    with files.locked(path):
      table = files.read_json(path) if os.path.exists(path) else {}
      table[key] = 1
      files.write_json(path, table)

  threads = [threading.Thread(target=add, args=(f'k{i}',)) for i in range(16)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert sorted(json.load(open(path))) == sorted(f'k{i}' for i in range(16))


def test_disk_full_is_found_in_causes():
  try:
    try:
      raise OSError(errno.ENOSPC, 'No space left on device', '/w/x')
    except OSError as e:
      raise ValueError('RESOURCE_EXHAUSTED: Error writing "a": Failed to write: '
                       'No space left on device [os_error_code=28]') from e
  except ValueError as e:
    assert 'No space left on device' in errors.disk_full(e)
  assert errors.disk_full(ValueError('other')) is None
