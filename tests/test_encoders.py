import pytest
import torch

from cmc_fast.encoders import NgramEncoder, TinyCNN, build_image_encoder, tiny_text_encoder
from cmc_fast.errors import UsageError


def test_ngram_encoder_is_the_mean_of_its_grams_and_ignores_padding():
    torch.manual_seed(0)
    enc = NgramEncoder(vocab_size=50, dim=8, buckets=97, dropout=0.0).eval()
    ids = torch.tensor([[5, 7, 9, 0, 0], [3, 4, 0, 0, 0]])
    mask = (ids != 0).long()
    out = enc(ids, mask)
    # computed another way: explicit list of unigram, bigram and trigram rows for the first post
    w = enc.embed.weight
    bi = lambda a, b: (a * 1000003 + b) % 97 + 50  # noqa: E731
    tri = lambda a, b, c: (a * 1000003 * 1000003 + b * 1000003 + c) % 97 + 50  # noqa: E731
    rows = [5, 7, 9, bi(5, 7), bi(7, 9), tri(5, 7, 9)]
    torch.testing.assert_close(out[0], w[rows].mean(0))
    torch.testing.assert_close(out[1], w[[3, 4, bi(3, 4)]].mean(0))
    # padding content does not matter
    ids2 = ids.clone()
    ids2[0, 3:] = 11
    torch.testing.assert_close(enc(ids2, mask), out)


def test_tiny_text_encoder_pools_only_real_tokens():
    torch.manual_seed(0)
    enc = tiny_text_encoder(vocab_size=30, max_len=12, dim=32, layers=1).eval()
    ids = torch.randint(4, 30, (3, 12))
    mask = torch.ones_like(ids)
    mask[:, 8:] = 0
    out = enc(ids, mask)
    ids2 = ids.clone()
    ids2[:, 8:] = 5
    assert out.shape == (3, 32)
    torch.testing.assert_close(enc(ids2, mask), out)


def test_image_encoders_and_missing_weights():
    assert TinyCNN()(torch.rand(2, 3, 32, 32)).shape == (2, 64)
    with pytest.raises(UsageError, match="--image-weights"):
        build_image_encoder("vgg19", "/no/such/vgg19.pth", (64, 32))
    enc = build_image_encoder("vgg19", None, (64, 32))
    assert enc.out_dim == 512 * 2 * 1
