"""ruDALL-E text tokenizer: a YouTokenToMe BPE model with ruDALL-E's framing."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import youtokentome as yttm

log = logging.getLogger(__name__)

PAD_ID = 0
UNK_ID = 1
BOS_ID = 2
EOS_ID = 3


class Tokenizer:
    """YouTokenToMe BPE as ruDALL-E uses it: ``[BOS] + ids + [EOS]``, zero-padded or cut."""

    def __init__(self, bpe: yttm.BPE, path: Path | None = None) -> None:
        self._bpe = bpe
        self.path = path

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Read a YouTokenToMe model file (``bpe.model``)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer model not found: {path}")
        try:
            bpe = yttm.BPE(model=str(path))
        except Exception as exc:  # yttm raises ValueError/RuntimeError depending on the damage
            raise ValueError(f"cannot read tokenizer model {path}: {exc}") from exc
        return cls(bpe, path)

    @property
    def vocab_size(self) -> int:
        return int(self._bpe.vocab_size())

    def encode(self, text: str, text_seq_length: int) -> torch.Tensor:
        """Encode one query: lower-cased and stripped, framed, padded with 0 or cut.

        Returns a LongTensor ``[text_seq_length]``. Cutting keeps the first positions, so a query
        longer than the text window loses its EOS, exactly as upstream ruDALL-E does.
        """
        if text_seq_length < 2:
            raise ValueError(f"text_seq_length must be at least 2, got {text_seq_length}")
        ids = self._bpe.encode([text.lower().strip()], output_type=yttm.OutputType.ID, dropout_prob=0.0)[0]
        framed = [BOS_ID, *ids, EOS_ID][:text_seq_length]
        out = torch.zeros(text_seq_length, dtype=torch.long)  # [text_seq_length], pads are PAD_ID (0)
        out[: len(framed)] = torch.tensor(framed, dtype=torch.long)
        return out

    def decode(self, ids: torch.Tensor) -> str:
        """Text of a token sequence, special ids dropped (for debugging and tests)."""
        special = [PAD_ID, UNK_ID, BOS_ID, EOS_ID]
        return str(self._bpe.decode([ids.tolist()], ignore_ids=special)[0])
