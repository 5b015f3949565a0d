"""``service.forward_clock``: forward times for the cost model without making the host wait for the device."""
from __future__ import annotations

import time

import torch
from conftest import cuda_only

from service.forward_clock import ForwardClock


def test_on_a_cpu_a_forward_is_timed_by_the_call_and_reported_once():
    clock = ForwardClock("cpu")
    mark = clock.start()
    time.sleep(0.02)
    clock.stop(mark, 64)
    (work, seconds), = clock.ready()
    assert work == 64 and 0.015 < seconds < 1.0
    assert clock.ready() == []


@cuda_only()
def test_on_cuda_a_forward_is_reported_once_the_device_has_run_it():
    clock = ForwardClock("cuda")
    a = torch.randn(4096, 4096, device="cuda")
    torch.cuda.synchronize()
    mark = clock.start()
    for _ in range(20):
        a = a @ a / 4096
    clock.stop(mark, 1)
    early = clock.ready()  # the host did not wait: the product may still be running
    done = early + clock.ready(wait=True)
    assert len(done) == 1 and done[0][1] > 0
