"""The one test-time mirroring rule every network reads its inputs through."""

import torch

from bidsapp.models.mirroring import LEFT_RIGHT, mirrored


def _predictor(w):
    return w * torch.linspace(0, 1, 6).reshape(1, 1, 6, 1, 1)  # deliberately not mirror-equivariant


def test_mirrored_averages_a_map_with_its_mirror_images():
    assert mirrored(_predictor, ()) is _predictor
    w = torch.randn(2, 3, 6, 5, 4)
    expected = (_predictor(w) + _predictor(w.flip(2)).flip(2)) / 2
    torch.testing.assert_close(mirrored(_predictor, LEFT_RIGHT)(w), expected)
    both = mirrored(_predictor, (0, 1))(w)
    passes = [_predictor(w)] + [_predictor(w.flip(d)).flip(d) for d in ([2], [3], [2, 3])]
    torch.testing.assert_close(both, sum(passes) / 4)


def test_mirrored_flips_every_input_together_and_keeps_per_input_outputs():
    """A pair of sessions is mirrored as a pair; class probabilities of the pair are not flipped back."""
    def pair_score(a, b):
        return torch.stack([_predictor(a).sum((1, 2, 3, 4)), (_predictor(b) * 2).sum((1, 2, 3, 4))], 1)

    a, b = torch.randn(3, 1, 6, 5, 4), torch.randn(3, 1, 6, 5, 4)
    got = mirrored(pair_score, LEFT_RIGHT, flip_output=False)(a, b)
    torch.testing.assert_close(got, (pair_score(a, b) + pair_score(a.flip(2), b.flip(2))) / 2)
    assert got.shape == (3, 2)
    assert not torch.allclose(got, pair_score(a, b))
