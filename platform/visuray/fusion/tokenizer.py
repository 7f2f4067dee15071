"""The text side's tokenizer: trained on the catalog's own text with ``tokenizers``, or loaded from a file.

No hub downloads: a tokenizer is either trained here (WordPiece over lowercased, accent-stripped words, a
few seconds on ~10k titles) or read from any ``tokenizer.json`` by path or ``s3://`` URI.

:meth:`TextTokenizer.encode` never fails on user text. It reports what it did instead, so that a caller
(the predictor, a Serve deployment) can tell its client:

- empty or blank text encodes to ``[CLS] [SEP]`` (``empty=True``);
- text longer than ``max_length`` tokens is cut to fit (``truncated=True``, ``num_tokens`` says how long
  it was);
- text of which no token is in the vocabulary (``no_known_tokens=True``), e.g. another script, encodes
  like empty text: a sequence of ``[UNK]`` carries no meaning the model was trained on.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from visuray.storage import StorageOptions, get_filesystem

if TYPE_CHECKING:
    import torch
    from tokenizers import Tokenizer

PAD, UNK, CLS, SEP = "[PAD]", "[UNK]", "[CLS]", "[SEP]"
SPECIAL_TOKENS = (PAD, UNK, CLS, SEP)


@dataclass(frozen=True)
class EncodedText:
    """One text as token ids, with what the tokenizer had to do to it."""

    ids: tuple[int, ...]
    num_tokens: int  # word pieces of the text before truncation (without [CLS]/[SEP])
    truncated: bool
    empty: bool
    no_known_tokens: bool

    @property
    def notes(self) -> list[str]:
        """Human-readable notes for a client: what happened to its text."""
        out = []
        if self.empty:
            out.append("empty text: the query is the reference image alone")
        if self.no_known_tokens:
            out.append("no word of the text is in the vocabulary: it was ignored (encoded as empty text)")
        if self.truncated:
            out.append(
                f"text truncated to its first {len(self.ids) - 2} of {self.num_tokens} tokens "
                "(the model's context)"
            )
        return out


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2000, min_frequency: int = 2) -> Tokenizer:
    """A WordPiece tokenizer trained on ``texts`` (lowercased, accents stripped, split on whitespace and
    punctuation), with the special tokens at ids 0-3."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.WordPiece(unk_token=UNK))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS)
    )
    tokenizer.train_from_iterator((t for t in texts if t), trainer=trainer)
    return tokenizer


def read_tokenizer_json(uri: str, options: StorageOptions | None = None) -> str:
    """The text of a ``tokenizer.json`` at a local path or ``s3://`` URI."""
    fs, path = get_filesystem(uri, options)
    try:
        return fs.cat_file(path).decode()
    except FileNotFoundError:
        raise FileNotFoundError(f"no tokenizer file at {uri}") from None


class TextTokenizer:
    """A ``tokenizers.Tokenizer`` with a fixed context, padding, and the bad-input handling above."""

    def __init__(self, tokenizer: Tokenizer, max_length: int) -> None:
        if max_length < 3:
            raise ValueError(f"max_length {max_length} leaves no room for text between [CLS] and [SEP]")
        missing = [t for t in SPECIAL_TOKENS if tokenizer.token_to_id(t) is None]
        if missing:
            raise ValueError(f"tokenizer lacks the special tokens {missing}")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.pad_id, self.unk_id, self.cls_id, self.sep_id = (
            tokenizer.token_to_id(t) for t in SPECIAL_TOKENS
        )

    @classmethod
    def from_json(cls, text: str, max_length: int) -> TextTokenizer:
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_str(text), max_length)

    @classmethod
    def load(cls, uri: str, max_length: int, options: StorageOptions | None = None) -> TextTokenizer:
        """Any ``tokenizer.json`` (path or s3://) with [PAD], [UNK], [CLS] and [SEP] in its vocabulary."""
        return cls.from_json(read_tokenizer_json(uri, options), max_length)

    def to_json(self) -> str:
        return self.tokenizer.to_str()

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str | None) -> EncodedText:
        """``[CLS] pieces... [SEP]``, at most ``max_length`` ids; never raises on any string."""
        text = text or ""
        pieces = self.tokenizer.encode(text, add_special_tokens=False).ids if text.strip() else []
        empty = not pieces
        no_known = bool(pieces) and all(i == self.unk_id for i in pieces)
        if no_known:
            pieces = []
        room = self.max_length - 2
        ids = (self.cls_id, *pieces[:room], self.sep_id)
        return EncodedText(
            ids=ids,
            num_tokens=len(pieces) if not no_known else 0,
            truncated=len(pieces) > room,
            empty=empty,
            no_known_tokens=no_known,
        )

    def encode_batch(self, texts: Sequence[str | None]) -> list[EncodedText]:
        return [self.encode(t) for t in texts]

    def to_tensors(self, encoded: Sequence[EncodedText]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids, padding_mask)``, both (B, L) with L the longest sequence; the mask is True at padding."""
        import torch

        length = max(len(e.ids) for e in encoded)
        ids = torch.full((len(encoded), length), self.pad_id, dtype=torch.long)
        for row, e in enumerate(encoded):
            ids[row, : len(e.ids)] = torch.tensor(e.ids, dtype=torch.long)
        return ids, ids == self.pad_id

    def __call__(self, texts: Sequence[str | None]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.to_tensors(self.encode_batch(texts))
