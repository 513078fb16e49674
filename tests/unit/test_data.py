import pytest
import torch

from mixsparse.pruner.io.data import (
    CalibrationProtocol,
    EvaluationProtocol,
    calibration_windows,
    evaluation_windows,
    load_text,
)
from mixsparse.runtime.errors import MixsparseError


class CharTokenizer:
    """One token per character: enough to check window arithmetic without a real tokenizer."""

    def __call__(self, text, **kwargs):
        return {"input_ids": [ord(c) % 1000 for c in text]}


def test_bundled_wikitext_is_there_with_both_splits():
    valid, test = load_text("wikitext2", "calibration"), load_text("wikitext2", "evaluation")
    assert len(valid) > 1_000_000 and len(test) > 1_200_000 and valid != test


def test_calibration_windows_are_seeded_and_shaped():
    protocol = CalibrationProtocol(samples=5, seqlen=32, seed=7)
    first = calibration_windows(CharTokenizer(), protocol)
    assert first.shape == (5, 32) and first.dtype == torch.long
    assert torch.equal(first, calibration_windows(CharTokenizer(), protocol))
    other = calibration_windows(CharTokenizer(), CalibrationProtocol(samples=5, seqlen=32, seed=8))
    assert not torch.equal(first, other)


def test_evaluation_windows_are_the_first_non_overlapping_ones(tmp_path):
    path = tmp_path / "eval.txt"
    path.write_text("abcdefghij" * 10)  # 100 tokens
    windows = evaluation_windows(CharTokenizer(), EvaluationProtocol(str(path), seqlen=30))
    assert windows.shape == (3, 30)
    assert windows[1, 0] == ord("a") and windows[2, 0] == ord("a")  # offsets 30 and 60
    assert evaluation_windows(CharTokenizer(), EvaluationProtocol(str(path), seqlen=30, windows=2)).shape == (2, 30)
    with pytest.raises(MixsparseError, match="3 windows of 30, but 4 were requested"):
        evaluation_windows(CharTokenizer(), EvaluationProtocol(str(path), seqlen=30, windows=4))


def test_jsonl_source(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "hello"}\n\n{"text": "world"}\n')
    assert load_text(str(path), "calibration") == "hello\n\nworld"
    path.write_text('{"body": "x"}\n')
    with pytest.raises(MixsparseError, match=r"data\.jsonl:1: expected a JSON object with a \"text\" field"):
        load_text(str(path), "calibration")


def test_calibration_text_shorter_than_a_window_is_refused(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("x" * 100)
    with pytest.raises(MixsparseError, match="has 100 tokens; windows of 512 tokens need at least 513"):
        calibration_windows(CharTokenizer(), CalibrationProtocol(str(path)))


def test_unknown_source():
    with pytest.raises(MixsparseError, match="unknown data source 'nope'"):
        load_text("nope", "calibration")
