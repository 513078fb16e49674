"""Calibration and evaluation text, and the token windows cut from it.

Sources: ``wikitext2`` (the bundled copy of WikiText-2, CC BY-SA 3.0, see data/wikitext-2/ATTRIBUTION.md;
works offline), ``hf:wikitext2`` and ``hf:c4`` (HF datasets, when the hub is reachable), or a path to
a ``.txt`` file or a ``.jsonl`` file with a ``"text"`` field per line (the same file serves both roles).

Default protocol, used by every number we publish: calibrate on 64 random windows of 512 tokens of
the validation split (seed 0); evaluate perplexity on the non-overlapping 2048-token windows of the
test split, all of them (or the first N).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import torch

from mixsparse.runtime.errors import MixsparseError

DEFAULT_SOURCE = "wikitext2"
CALIBRATION, EVALUATION = "calibration", "evaluation"
QUICK_WINDOWS = 40
_BUNDLED_SPLITS = {CALIBRATION: "valid.txt", EVALUATION: "test.txt"}
_HF = {
    "hf:wikitext2": {
        CALIBRATION: ("wikitext", "wikitext-2-raw-v1", "validation", None),
        EVALUATION: ("wikitext", "wikitext-2-raw-v1", "test", None),
    },
    # the usual SparseGPT/Wanda choice: calibrate on the first train shard, evaluate on validation
    "hf:c4": {
        CALIBRATION: ("allenai/c4", None, "train", "en/c4-train.00000-of-01024.json.gz"),
        EVALUATION: ("allenai/c4", None, "validation", "en/c4-validation.00000-of-00008.json.gz"),
    },
}


@dataclass(frozen=True)
class CalibrationProtocol:
    source: str = DEFAULT_SOURCE
    samples: int = 64
    seqlen: int = 512
    seed: int = 0

    def to_json(self) -> dict:
        return {**asdict(self), "split": describe(self.source, CALIBRATION)}


@dataclass(frozen=True)
class EvaluationProtocol:
    source: str = DEFAULT_SOURCE
    seqlen: int = 2048
    windows: int | None = None  # None: all windows

    def to_json(self) -> dict:
        return {**asdict(self), "split": describe(self.source, EVALUATION)}


def describe(source: str, role: str) -> str:
    if source == DEFAULT_SOURCE:
        return f"WikiText-2 (bundled) {_BUNDLED_SPLITS[role].removesuffix('.txt')}"
    if source in _HF:
        name, config, split, _ = _HF[source][role]
        return f"HF {name}{'/' + config if config else ''} {split}"
    return f"file {source}"


def load_text(source: str, role: str) -> str:
    """The raw text for ``role`` (calibration or evaluation) from ``source``."""
    if source == DEFAULT_SOURCE:
        return (
            resources.files("mixsparse.pruner")
            .joinpath("data/wikitext-2", _BUNDLED_SPLITS[role])
            .read_text(encoding="utf-8")
        )
    if source in _HF:
        return _load_hf(source, *_HF[source][role])
    path = Path(source)
    if not path.is_file():
        raise MixsparseError(
            f"unknown data source {source!r}: not a file, and not one of {', '.join([DEFAULT_SOURCE, *_HF])}"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise MixsparseError(f"{path} is not UTF-8 text ({error.reason} at byte {error.start})") from None
    except OSError as error:
        raise MixsparseError(f"cannot read {path} ({error.strerror})") from None
    if path.suffix == ".jsonl":
        texts = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    texts.append(json.loads(line)["text"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise MixsparseError(f'{path}:{number}: expected a JSON object with a "text" field') from None
        return "\n\n".join(texts)
    return text


def _load_hf(source: str, name: str, config: str | None, split: str, data_file: str | None) -> str:
    try:
        import datasets
    except ImportError:
        raise MixsparseError(f"data source {source} needs the 'datasets' package (pip install datasets)") from None
    try:
        kwargs = {"data_files": {split: data_file}} if data_file else {}
        dataset = datasets.load_dataset(name, config, split=split, **kwargs)
    except Exception as error:  # network, hub or cache errors of many kinds
        raise MixsparseError(
            f"could not load {source} from the HF hub ({type(error).__name__}: {error}); "
            f"use the bundled '{DEFAULT_SOURCE}' or a local file"
        ) from None
    texts = dataset["text"]
    if source == "hf:c4":
        texts = texts[:5000]  # one shard is far more than any protocol here needs
    return "\n\n".join(texts)


def tokenize(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor(tokenizer(text, return_attention_mask=False, verbose=False)["input_ids"], dtype=torch.long)


def calibration_windows(tokenizer, protocol: CalibrationProtocol = CalibrationProtocol()) -> torch.Tensor:
    """``samples`` windows of ``seqlen`` tokens at random offsets (seeded), shape (samples, seqlen)."""
    ids = tokenize(tokenizer, load_text(protocol.source, CALIBRATION))
    if len(ids) <= protocol.seqlen:
        raise MixsparseError(
            f"calibration text ({describe(protocol.source, CALIBRATION)}) has {len(ids)} tokens; "
            f"windows of {protocol.seqlen} tokens need at least {protocol.seqlen + 1}"
        )
    generator = torch.Generator().manual_seed(protocol.seed)
    starts = torch.randint(0, len(ids) - protocol.seqlen, (protocol.samples,), generator=generator)
    return torch.stack([ids[s : s + protocol.seqlen] for s in starts.tolist()])


def evaluation_windows(tokenizer, protocol: EvaluationProtocol = EvaluationProtocol()) -> torch.Tensor:
    """The non-overlapping ``seqlen`` windows of the evaluation text, the first ``windows`` of them."""
    ids = tokenize(tokenizer, load_text(protocol.source, EVALUATION))
    available = len(ids) // protocol.seqlen
    wanted = available if protocol.windows is None else protocol.windows
    if wanted < 1 or wanted > available:
        raise MixsparseError(
            f"evaluation text ({describe(protocol.source, EVALUATION)}) has {len(ids)} tokens: "
            f"{available} windows of {protocol.seqlen}, but {wanted} were requested"
        )
    return ids[: wanted * protocol.seqlen].reshape(wanted, protocol.seqlen)
