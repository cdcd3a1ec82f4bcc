"""Backend openers for the probe tests, loaded by name in the probe's child process: one
whose OpenVINO load dies natively (a read of address 0: SIGSEGV), one whose load aborts
(SIGABRT), and one whose load never returns."""

from __future__ import annotations

import ctypes
import os
import time
from pathlib import Path

from fleet.inference.backends import open_backend
from fleet.inference.backends.base import BackendOptions, InferenceBackend


def segfault_openvino(name: str, model_path: Path, options: BackendOptions) -> InferenceBackend:
    if name == "openvino":
        ctypes.string_at(0)
    return open_backend(name, model_path, options)


def abort_openvino(name: str, model_path: Path, options: BackendOptions) -> InferenceBackend:
    if name == "openvino":
        os.abort()
    return open_backend(name, model_path, options)


def hang_openvino(name: str, model_path: Path, options: BackendOptions) -> InferenceBackend:
    if name == "openvino":
        time.sleep(3600)
    return open_backend(name, model_path, options)
