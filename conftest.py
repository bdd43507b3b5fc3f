"""pytest configuration: the hypothesis profile that keeps the suite thorough but fast on 2 cores."""
import os

import torch
from hypothesis import HealthCheck, settings

# Property tests draw tensors; their first call can be slow (lazy kernel set-up), so no per-example deadline.
settings.register_profile(
    "default",
    max_examples=int(os.environ.get("HYPOTHESIS_MAX_EXAMPLES", "40")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("thorough", max_examples=500, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

# Two cores: more threads than that only adds contention in the small tensors the tests use.
torch.set_num_threads(min(2, torch.get_num_threads()))
