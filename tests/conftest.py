"""Test-session settings: one torch thread per pytest-xdist worker.

Two workers on two cores with torch's default intra-op threads oversubscribe
the machine and make the zoo ten times slower.
"""

import torch

torch.set_num_threads(1)
