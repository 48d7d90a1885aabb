"""Prompt sources: text, JSONL, parquet, COCO captions; limit and repeats; clear errors."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from instaflow_pl.data import load_prompts
from instaflow_pl.errors import UserError


def test_text_file_skips_blank_lines(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("a cat\n\n  a dog  \n")
    assert load_prompts(path) == ["a cat", "a dog"]


def test_jsonl_with_column(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"text": "a cat", "id": 1}\n{"text": "a dog", "id": 2}\n')
    assert load_prompts(path, column="text") == ["a cat", "a dog"]


def test_parquet_with_column(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"caption": ["a cat", "a dog", "a bird"]}), path)
    assert load_prompts(path, column="caption", limit=2) == ["a cat", "a dog"]


def test_coco_captions(tmp_path):
    path = tmp_path / "captions_val2017.json"
    path.write_text(
        json.dumps(
            {
                "images": [],
                "annotations": [{"image_id": 1, "caption": " A cat. "}, {"image_id": 2, "caption": "A dog."}],
            }
        )
    )
    assert load_prompts(path) == ["A cat.", "A dog."]


def test_limit_then_repeats(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("a\nb\nc\n")
    assert load_prompts(path, limit=2, repeats=3) == ["a", "a", "a", "b", "b", "b"]


def test_empty_prompt_file(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("\n \n")
    with pytest.raises(UserError, match="holds no prompts"):
        load_prompts(path)


def test_missing_column_names_the_columns(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"caption": ["a cat"]}), path)
    with pytest.raises(UserError, match=r"no column 'prompt'; set column to one of \['caption'\]"):
        load_prompts(path)
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"caption": "a cat"}\n')
    with pytest.raises(UserError, match="no column 'prompt'"):
        load_prompts(jsonl)


def test_undecodable_prompt_file(tmp_path):
    path = tmp_path / "p.txt"
    path.write_bytes(b"a cat\n\xff\xfe bad bytes\n")
    with pytest.raises(UserError, match="is not UTF-8 text"):
        load_prompts(path)


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(UserError, match="prompt file not found"):
        load_prompts(tmp_path / "none.txt")
    odd = tmp_path / "p.xyz"
    odd.write_text("a")
    with pytest.raises(UserError, match="cannot tell the format"):
        load_prompts(odd)
    assert load_prompts(odd, format="txt") == ["a"]
