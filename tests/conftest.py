"""Suite-wide settings: one torch thread, because tiny models run faster without
thread hand-offs on a 2-core machine; real-model tests raise it themselves."""

import torch

torch.set_num_threads(1)
