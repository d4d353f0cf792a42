"""Shape helpers against TF's own padding and output sizes (via the numpy reference, which keeps its own
copy on purpose, and brute force)."""

import numpy as np
import pytest

from convrewrite import reference, shapes


@pytest.mark.parametrize("size,k,s,d", [(n, k, s, d) for n in (1, 5, 8, 13) for k in (1, 2, 3, 5) for s in (1, 2, 3)
                                        for d in (1, 2)])
def test_padding_and_output_sizes_match_the_reference(size, k, s, d):
    eff = shapes.effective_length(k, d)
    assert shapes.same_pads(size, eff, s) == reference.same_padding(size, k, s, d)
    x = np.zeros((1, size, 1, 1), "float32")
    w = np.ones((k, 1, 1, 1), "float32")
    for padding in ("same", "valid"):
        expected = reference.conv2d(x, w, strides=(s, 1), padding=padding, dilation=(d, 1)).shape[1]
        assert shapes.output_length(size, eff, s, padding) == expected
    assert shapes.output_length(None, eff, s, "same") is None


def test_pairs_name_the_argument_and_owner():
    assert shapes.pair(3, "strides") == (3, 3) and shapes.pair([2, 1], "strides") == (2, 1)
    with pytest.raises(ValueError, match=r"Received invalid strides=\(0, 1\) for PacPool2D 'p'; expected an int or a pair of ints >= 1"):
        shapes.pair((0, 1), "strides", "PacPool2D 'p'")
    with pytest.raises(ValueError, match="kernel"):
        shapes.pair("abc", "kernel")
    assert shapes.pair((0, 0), "padding", minimum=0) == (0, 0)
