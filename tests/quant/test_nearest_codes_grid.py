"""The grid lookup for nearest codes against one comparison per midpoint."""
import pytest
import torch

from loraq.quant.codes import code_for, midpoints, sorted_order
from loraq.quant.functional import nearest_codes, nearest_codes_by_comparison


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_grid_lookup_equals_comparisons(quant_type):
    code = code_for(quant_type)
    g = torch.Generator().manual_seed(0)
    mids = midpoints(code[sorted_order(code)])
    # random values, every midpoint exactly, and its float32 neighbours on both sides
    edge = torch.cat([mids, torch.nextafter(mids, torch.tensor(2.0)), torch.nextafter(mids, torch.tensor(-2.0))])
    x = torch.cat([torch.rand(200_001, generator=g) * 2 - 1, edge, torch.tensor([-1.0, 1.0, 0.0, -0.0])])
    x = x.clamp(-1, 1)
    assert torch.equal(nearest_codes(x, code), nearest_codes_by_comparison(x, code))
