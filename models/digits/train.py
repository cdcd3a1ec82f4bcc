"""Deterministic training of the digits networks on CPU."""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

BATCH_SIZE = 64
# Bounded threads keep builds deterministic and leave a core free on 2-core machines.
TORCH_THREADS = 2


def set_determinism(seed: int) -> None:
    torch.manual_seed(seed)
    torch.set_num_threads(TORCH_THREADS)
    torch.use_deterministic_algorithms(True)


def to_tensor(x01: np.ndarray) -> torch.Tensor:
    """Images already preprocessed to [0, 1], shape [N, 8, 8] -> [N, 1, 8, 8]."""
    return torch.from_numpy(np.ascontiguousarray(x01, dtype=np.float32)).unsqueeze(1)


# Distillation: temperature of the soft targets and weight of the hard-label loss. Soft targets
# from the cloud model teach the edge model which inputs are ambiguous, so its confidence ranks
# its own errors better (what the hard-example policy relies on).
KD_TEMPERATURE = 4.0
KD_HARD_WEIGHT = 0.3


def train(make_model: Callable[[], nn.Module], x01: np.ndarray, y: np.ndarray, *, epochs: int,
          lr: float, seed: int, weight_decay: float = 1e-4,
          teacher_logits: np.ndarray | None = None) -> nn.Module:
    """Seed, build the model (so its initial weights are seeded too) and train it.

    With `teacher_logits` the loss is knowledge distillation (Hinton et al., 2015):
    a * CE(labels) + (1 - a) * T^2 * KL(teacher/T || student/T).
    """
    set_determinism(seed)
    model = make_model()
    xt, yt = to_tensor(x01), torch.from_numpy(y.astype(np.int64))
    tt = torch.from_numpy(teacher_logits.astype(np.float32)) if teacher_logits is not None else None
    kl = nn.KLDivLoss(reduction="batchmean")
    t = KD_TEMPERATURE
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * ((len(yt) + BATCH_SIZE - 1) // BATCH_SIZE)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(yt), generator=gen)
        total = 0.0
        for i in range(0, len(yt), BATCH_SIZE):
            idx = perm[i:i + BATCH_SIZE]
            opt.zero_grad()
            out = model(xt[idx])
            loss = loss_fn(out, yt[idx])
            if tt is not None:
                soft = kl(torch.log_softmax(out / t, 1), torch.softmax(tt[idx] / t, 1))
                loss = KD_HARD_WEIGHT * loss + (1 - KD_HARD_WEIGHT) * t * t * soft
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        if epoch % 10 == 9 or epoch == epochs - 1:
            log.info("epoch %d/%d loss %.4f", epoch + 1, epochs, total / len(yt))
    model.eval()
    return model
