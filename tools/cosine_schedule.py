"""The learning-rate schedule of the ConvNeXt recipe, in numpy float64, for the fixture
generators in this folder: a linear warmup from `start_warmup_value` to `base_value` over the
warmup iterations (numpy.linspace, so its last value is `base_value`; none when warmup_epochs
is 0, as in the official code), then a half cosine from `base_value` towards `final_value` over
the remaining iterations. One value per iteration, epochs * niter_per_ep in all. The C++ side
is train/optim/schedule.h; tests compare the two."""
import math

import numpy as np


def cosine_scheduler(base_value, final_value, epochs, niter_per_ep, warmup_epochs=0,
                     start_warmup_value=0, warmup_steps=-1):
    total = epochs * niter_per_ep
    warmup_iters = warmup_steps if warmup_steps > 0 else warmup_epochs * niter_per_ep
    warmup = (np.linspace(start_warmup_value, base_value, warmup_iters) if warmup_epochs > 0
              else np.array([]))
    decay_iters = total - warmup_iters
    decay = np.array([final_value + 0.5 * (base_value - final_value) *
                      (1 + math.cos(math.pi * i / decay_iters)) for i in range(decay_iters)])
    schedule = np.concatenate((warmup, decay))
    assert len(schedule) == total, (len(schedule), total)
    return schedule
