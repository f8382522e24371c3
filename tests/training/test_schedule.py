"""Our schedule against transformers' own warmup schedules."""
import pytest
import torch
from transformers import (
    get_constant_schedule_with_warmup,
    get_cosine_schedule_with_warmup,
    get_linear_schedule_with_warmup,
)

from loraq.training.schedule import make_scheduler, warmup_steps

HF = {
    "cosine": lambda opt, w, t: get_cosine_schedule_with_warmup(opt, w, t),
    "linear": lambda opt, w, t: get_linear_schedule_with_warmup(opt, w, t),
    "constant": lambda opt, w, t: get_constant_schedule_with_warmup(opt, w),
}


@pytest.mark.parametrize("schedule", list(HF))
@pytest.mark.parametrize("warmup,total", [(0, 10), (3, 20), (5, 5)])
def test_schedule_matches_transformers(schedule, warmup, total):
    def lrs(make):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
        sched = make(opt)
        out = []
        for _ in range(total):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    ours = lrs(lambda opt: make_scheduler(opt, total, warmup, schedule))
    ref = lrs(lambda opt: HF[schedule](opt, warmup, total))
    assert ours == pytest.approx(ref, abs=1e-12)


def test_warmup_fraction_and_steps():
    assert warmup_steps(0.1, 100) == 10
    assert warmup_steps(7, 100) == 7
    assert warmup_steps(500, 100) == 100
    assert warmup_steps(0.0, 100) == 0
