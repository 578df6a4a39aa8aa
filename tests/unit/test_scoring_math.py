"""The scoring path's own arithmetic, against torch's reference functions."""

from __future__ import annotations

import torch

from spark_ddl.common.objectives import softmax_rows


def test_softmax_rows_equals_torch_softmax_also_for_large_and_tied_logits():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(1000, 10, generator=generator) * 30
    logits[0] = 1e4  # overflow in a naive exp
    logits[1, :5] = 7.0  # ties
    logits[2] = -1e4
    expected = torch.softmax(logits, dim=1)
    actual = softmax_rows(logits.clone())
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-7)
    assert torch.equal(actual.argmax(dim=1), expected.argmax(dim=1))
    assert softmax_rows(torch.empty(0, 10)).shape == (0, 10)
