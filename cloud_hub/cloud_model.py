"""The cloud model as the hub uses it: raw inputs in, one answer (or one refusal) each out.

Offloads and late hard examples go through the same sequence: check each input's shape against
the bundle's raw input, run the fitting ones as one batch, return the top class and its
probability, or the reason an input was refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fleet.inference.errors import InputError
from fleet.inference.model import Model


@dataclass(frozen=True, slots=True)
class CloudAnswer:
    label: int = -1
    confidence: float = 0.0
    error: str | None = None  # set: the input was refused, and why


class CloudModel:
    def __init__(self, model: Model) -> None:
        self.model = model
        self.ref = model.manifest.ref
        self.raw_shape = tuple(model.manifest.raw_input.shape)

    def fits(self, shape: tuple[int, ...], batched: bool = False) -> str | None:
        """None if an input of `shape` fits the model (also as a batch of one when `batched`),
        else why not."""
        if shape == self.raw_shape or (batched and shape[1:] == self.raw_shape
                                       and shape[:1] == (1,)):
            return None
        return (f"input shape {list(shape)} does not fit the cloud model's "
                f"{list(self.raw_shape)}")

    def answer(self, inputs: list[np.ndarray], batched: bool = False) -> list[CloudAnswer]:
        """One answer per input, in order: the fitting inputs run as one batch."""
        out: list[CloudAnswer | None] = []
        fit: list[int] = []
        for i, x in enumerate(inputs):
            why = self.fits(tuple(x.shape), batched)
            out.append(CloudAnswer(error=why) if why else None)
            if why is None:
                fit.append(i)
        if fit:
            try:
                probs = self.model.predict_batch(
                    np.stack([inputs[i].reshape(self.raw_shape) for i in fit]))
            except InputError as exc:
                for i in fit:
                    out[i] = CloudAnswer(error=str(exc))
            else:
                for i, pr in zip(fit, probs, strict=True):
                    label = int(pr.argmax())
                    out[i] = CloudAnswer(label, float(pr[label]))
        return [a for a in out if a is not None]
