"""A custom Locust load shape: warm-up ramp, hold, spike, hold, ramp down — bounded in users and time.

Add it to the locustfile list to use it (Locust then ignores -u/-r/-t and follows the shape):

  locust -f loadtests/locustfile.py,loadtests/locust_shape.py --headless --host ...

The peak user count and the total duration come from CINEVIVID_LOCUST_USERS (default 20) and
CINEVIVID_LOCUST_RUN_TIME_S (default 60); loadtests/run_locust.py sets both from -u and -t.
"""

from __future__ import annotations

import os

from locust import LoadTestShape

# (fraction of the run at which the stage ends, fraction of the peak users, spawn rate per second)
STAGES = [
    (0.20, 0.25, 5.0),   # warm-up ramp
    (0.45, 0.60, 5.0),   # steady
    (0.60, 1.00, 20.0),  # spike to the peak
    (0.85, 0.60, 20.0),  # back to steady
    (1.00, 0.10, 20.0),  # ramp down
]


class RampHoldSpikeShape(LoadTestShape):
    def __init__(self):
        super().__init__()
        self.peak = max(1, int(os.environ.get("CINEVIVID_LOCUST_USERS", "20")))
        self.duration = max(1.0, float(os.environ.get("CINEVIVID_LOCUST_RUN_TIME_S", "60")))

    def tick(self):
        t = self.get_run_time() / self.duration
        for end, frac, rate in STAGES:
            if t < end:
                return max(1, round(self.peak * frac)), rate
        return None  # stop
