"""Records: dataclasses to JSON and back, atomically, with keywords as keys and unknown keys ignored."""

import dataclasses
import json

import pytest

from unbounded_agent import records


@dataclasses.dataclass
class Inner:
    slot: str | None = None
    n: int = 0


@dataclasses.dataclass
class Outer:
    id: str
    from_: Inner | None = dataclasses.field(default=None, metadata={"key": "from"})
    items: list[Inner] = dataclasses.field(default_factory=list)
    extra: dict | None = None


def test_a_record_survives_the_round_trip_with_nested_records_and_keyword_keys(tmp_path):
    rec = Outer("a", Inner("blue", 2), [Inner("green"), Inner()], {"k": [1, 2]})
    records.save(rec, tmp_path / "r.json", mode=0o600)
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["from"] == {"slot": "blue", "n": 2} and "from_" not in doc
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o600
    assert records.load(Outer, tmp_path / "r.json") == rec


def test_unknown_keys_are_ignored_and_missing_ones_take_their_defaults(tmp_path):
    (tmp_path / "r.json").write_text(json.dumps({"id": "b", "newer_field": 1, "from": {"slot": "x", "later": 2}}))
    assert records.load(Outer, tmp_path / "r.json") == Outer("b", Inner("x"))


def test_absent_is_none_and_corrupt_or_incomplete_is_an_error_naming_the_file(tmp_path):
    assert records.load(Outer, tmp_path / "none.json") is None
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(records.CorruptRecord, match="bad.json"):
        records.load(Outer, tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(records.CorruptRecord, match="list.json"):
        records.load(Outer, tmp_path / "list.json")
    (tmp_path / "partial.json").write_text("{}")  # the required id is missing
    with pytest.raises(records.CorruptRecord, match="partial.json"):
        records.load(Outer, tmp_path / "partial.json")


def test_a_save_leaves_no_temporary_file_behind(tmp_path):
    for i in range(3):
        records.save(Outer(str(i)), tmp_path / "r.json")
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]
    assert records.load(Outer, tmp_path / "r.json").id == "2"
