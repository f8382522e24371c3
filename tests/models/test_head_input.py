"""A frozen head fed a strided last-position slice must not broadcast its weight (generation memory)."""
import resource

import torch

from loraq.models.load import contiguous_head_input


def test_contiguous_head_input_keeps_one_matrix_product():
    torch.manual_seed(0)
    model = torch.nn.Module()
    head = torch.nn.Linear(64, 20000, bias=False).to(torch.bfloat16).requires_grad_(False)
    model.get_output_embeddings = lambda: head
    hidden = torch.randn(64, 30, 64, dtype=torch.bfloat16)[:, -1:, :]  # what logits_to_keep=1 passes
    with torch.no_grad():
        expected = (hidden.reshape(64, 64).float() @ head.weight.float().t()).reshape(64, 1, -1)
        contiguous_head_input(model)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out = head(hidden)
        grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)
    # the broadcast path would copy the weight 64 times (64 * 64 * 20000 * 2 bytes = 164 MB)
    assert grown_kib < 40_000
