from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import youtokentome as yttm

from app.engine.tokenizer import BOS_ID, EOS_ID, Tokenizer


@pytest.fixture(scope="module")
def bpe_path(tiny_model_dir: Path) -> Path:
    return tiny_model_dir / "tokenizer" / "bpe.model"


@pytest.fixture(scope="module")
def tok(bpe_path: Path) -> Tokenizer:
    return Tokenizer.load(bpe_path)


def upstream_encode(bpe: yttm.BPE, text: str, text_seq_length: int) -> torch.Tensor:
    """ruDALL-E's YTTMTokenizerWrapper.encode_text + prepare_tokens, restated for comparison."""
    tokens = bpe.encode([text], output_type=yttm.OutputType.ID, dropout_prob=0.0)[0]
    tokens = [2] + tokens + [3]
    empty = text_seq_length - len(tokens)
    if empty > 0:
        tokens = np.hstack((tokens, np.zeros(empty)))
    if len(tokens) > text_seq_length:
        tokens = tokens[:text_seq_length]
    return torch.tensor(tokens).long()


def test_encode_frames_ids_with_bos_and_eos_then_zero_pads(tok: Tokenizer, bpe_path: Path) -> None:
    ids = yttm.BPE(model=str(bpe_path)).encode(["кот в шляпе"], output_type=yttm.OutputType.ID)[0]
    out = tok.encode("кот в шляпе", 128)
    assert out.dtype == torch.long and out.shape == (128,)
    assert out[: len(ids) + 2].tolist() == [BOS_ID, *ids, EOS_ID]
    assert not out[len(ids) + 2 :].any()


@pytest.mark.parametrize("text", ["синий кот", "ёжик в тумане", "рыжий кот спит на диване", "", "zebra 42"])
@pytest.mark.parametrize("length", [128, 6, 2])
def test_encode_matches_upstream_wrapper(tok: Tokenizer, bpe_path: Path, text: str, length: int) -> None:
    expected = upstream_encode(yttm.BPE(model=str(bpe_path)), text, length)
    assert torch.equal(tok.encode(text, length), expected)


def test_encode_lowercases_and_strips_the_query(tok: Tokenizer) -> None:
    assert torch.equal(tok.encode("  Кот В ШЛЯПЕ \n", 128), tok.encode("кот в шляпе", 128))


def test_encode_cuts_long_text_to_the_window_dropping_eos(tok: Tokenizer) -> None:
    out = tok.encode("кот в шляпе " * 40, 16)
    assert out.shape == (16,)
    assert out[0] == BOS_ID
    assert (out != 0).all() and (out[1:] != EOS_ID).all()


def test_encode_rejects_a_window_too_short_for_the_frame(tok: Tokenizer) -> None:
    with pytest.raises(ValueError, match="text_seq_length"):
        tok.encode("кот", 1)


def test_vocab_size_is_the_bpe_models(tok: Tokenizer, bpe_path: Path) -> None:
    assert tok.vocab_size == yttm.BPE(model=str(bpe_path)).vocab_size()


def test_decode_round_trips_known_words(tok: Tokenizer) -> None:
    assert tok.decode(tok.encode("Синий кот", 128)) == "синий кот"


def test_load_names_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.model"):
        Tokenizer.load(tmp_path / "nope.model")
