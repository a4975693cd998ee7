"""The shard helpers of tests/data_shards/test_reader.py (features, boxes, captions, tokenize,
write_split) for the other reader test modules. tests/ is on sys.path, where "data_shards" is the
package, so test_reader.py is loaded by its path, once."""

from __future__ import annotations

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "_reader_test_helpers", Path(__file__).parent / "data_shards" / "test_reader.py")
assert _spec is not None and _spec.loader is not None
_helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_helpers)

REGIONS = _helpers.REGIONS
boxes_for, caption, features = _helpers.boxes_for, _helpers.caption, _helpers.features
tokenize, write_split = _helpers.tokenize, _helpers.write_split
