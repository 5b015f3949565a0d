"""models.default_dtype: a scope with another default floating-point type, left the way it was entered."""
import pytest
import torch

from models.default_dtype import default_dtype


def test_the_previous_default_comes_back_however_the_scope_is_left():
    before = torch.get_default_dtype()
    with default_dtype(torch.float64):
        assert torch.tensor([1.0]).dtype == torch.float64 and torch.nn.Linear(2, 2).weight.dtype == torch.float64
        with default_dtype(torch.float32):
            assert torch.tensor([1.0]).dtype == torch.float32
        assert torch.get_default_dtype() == torch.float64
    assert torch.get_default_dtype() == before
    with pytest.raises(RuntimeError), default_dtype(torch.float64):
        raise RuntimeError("fails inside")
    assert torch.get_default_dtype() == before
