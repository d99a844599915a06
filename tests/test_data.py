import json

import pytest

from qtool.data import load_text
from qtool.errors import DatasetError


def test_txt_is_read_as_is(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("line one\nline two\n")
    text = load_text(str(path))
    assert text.content == "line one\nline two\n"
    assert text.describe()["sha256"] == text.sha256 and len(text.sha256) == 64


def test_jsonl_and_json_rows_are_joined_by_blank_lines(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "first"}\n\n{"text": "second", "id": 2}\n')
    (tmp_path / "b.json").write_text(json.dumps([{"text": "first"}, {"text": "second"}]))
    assert load_text(str(tmp_path / "a.jsonl")).content == "first\n\nsecond"
    assert load_text(str(tmp_path / "b.json")).content == "first\n\nsecond"


def test_builtin_text_is_the_projects_own_and_varied():
    text = load_text("builtin")
    paragraphs = [p for p in text.content.split("\n\n") if p.strip()]
    assert len(paragraphs) >= 100
    assert len(text.content.split()) > 4000


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.txt", "", "is empty"),
        ("blank.txt", "  \n\n", "is empty"),
        ("bad.jsonl", '{"text": "ok"}\n{oops\n', "line 2 is not valid JSON"),
        ("notext.jsonl", '{"body": "x"}\n', "row 1 has no string field 'text'"),
        ("dict.json", '{"text": "x"}', "JSON list"),
    ],
)
def test_bad_files_are_one_line_errors(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DatasetError, match=message):
        load_text(str(path))


def test_binary_missing_and_folder_sources(tmp_path):
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00\x81garbage")
    with pytest.raises(DatasetError, match="not UTF-8"):
        load_text(str(tmp_path / "bin.txt"))
    with pytest.raises(DatasetError, match="neither a file nor a known name"):
        load_text(str(tmp_path / "missing.txt"))
    with pytest.raises(DatasetError, match="is a folder"):
        load_text(str(tmp_path))


def test_named_dataset_offline_says_so(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.qtool-test.invalid")
    with pytest.raises(DatasetError, match="unreachable|needs the datasets package"):
        load_text("c4")
