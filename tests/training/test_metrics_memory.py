"""summary.json's CPU peak is the run's own: not the high-water mark Linux carries over from its parent."""
import subprocess
import sys

import pytest
import torch

from loraq.training.metrics import peak_rss_bytes

CHILD = ("import resource; from loraq.training.metrics import peak_rss_bytes; "
         "print(peak_rss_bytes(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the carried-over high-water mark is Linux's")
def test_a_child_of_a_large_process_reports_its_own_peak():
    held = torch.ones(600 * 2**20 // 4)  # 600 MB resident in this (parent) process when the child starts
    parent_peak = peak_rss_bytes()
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True).stdout.split()
    ours, ru_maxrss = int(out[0]), int(out[1])
    assert held.sum() > 0 and parent_peak > 600e6
    assert ru_maxrss >= parent_peak - 50e6  # the inherited mark: what summary.json used to report
    assert ours < parent_peak - 400e6  # the child's own peak (torch imported: ~200-300 MB)
