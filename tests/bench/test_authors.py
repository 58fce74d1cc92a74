"""bench/authors_common.py: the authors' code is changed only where each change matches as expected."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from authors_common import AdapterError, Change, apply_changes, read_source  # noqa: E402


def test_each_change_must_match_exactly_once_unless_it_replaces_every_occurrence(tmp_path):
    source = "x = a.cuda()\ny = b.cuda()\nlr = 0.02\n"
    assert apply_changes(source, [Change("lr = 0.02", "lr = 0.05", "our schedule")], "f.py", "abc") == \
        "x = a.cuda()\ny = b.cuda()\nlr = 0.05\n"
    assert apply_changes(source, [Change(".cuda()", "", "CPU", every=True)], "f.py", "abc") == "x = a\ny = b\nlr = 0.02\n"
    with pytest.raises(AdapterError, match=r"f.py: expected exactly one occurrence of '.cuda\(\)', found 2; .* abc"):
        apply_changes(source, [Change(".cuda()", "", "CPU")], "f.py", "abc")
    with pytest.raises(AdapterError, match="found 0"):
        apply_changes(source, [Change("momentum", "", "gone in a later version")], "f.py", "abc")
    (tmp_path / "t.py").write_bytes(b"a = 1   \r\nb = 2\r\n")  # their files: CRLF and trailing blanks
    assert read_source(tmp_path / "t.py") == "a = 1\nb = 2\n"
