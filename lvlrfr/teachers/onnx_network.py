"""The network behind an ONNX recognizer: converted to torch by onnx2torch, or run by onnxruntime.

The onnx2torch module behaves like any torch module: it moves to the GPU with Lightning, runs
under ``torch.autocast`` and passes gradients to its input. The onnxruntime module runs on CPU
through numpy and is the fallback for graphs that onnx2torch cannot convert.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "onnx2torch", "onnxruntime")
"""Teacher backends; ``"onnx2torch"`` is another name for ``"torch"``."""


def build_onnx_network(model: Any, path: str | os.PathLike, backend: str = "auto") -> nn.Module:
    """Return a module that runs the ONNX ``model`` loaded from ``path`` with the chosen backend.

    ``"torch"``/``"onnx2torch"`` convert with onnx2torch and raise ValueError when that fails,
    ``"onnxruntime"`` runs the file with onnxruntime, and ``"auto"`` converts and falls back to
    onnxruntime with a warning.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown teacher backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "onnxruntime":
        return OnnxRuntimeNetwork(path)

    from onnx2torch import convert

    try:
        return convert(clear_redundant_allowzero(model))
    except Exception as error:  # onnx2torch raises NotImplementedError, KeyError, ... for unsupported ops
        if backend != "auto":
            raise ValueError(
                f"onnx2torch cannot convert {path} ({type(error).__name__}: {error}); use backend 'onnxruntime' "
                "or export the model again with opset_version 17 or lower"
            ) from error
        logger.warning("onnx2torch cannot convert %s (%s); running it with onnxruntime on CPU", path, error)
        return OnnxRuntimeNetwork(path)


def clear_redundant_allowzero(model: Any) -> Any:
    """Set ``allowzero=0`` on Reshape nodes whose target shape is a constant without zeros.

    torch's dynamo ONNX exporter writes ``allowzero=1``, which onnx2torch 1.5 does not implement.
    The attribute only changes how a 0 in the target shape is read, so clearing it is exact when the
    shape is a constant with no 0. Reshapes with computed shapes keep the attribute.
    """
    from onnx import numpy_helper

    constants = {tensor.name: tensor for tensor in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            constants[node.output[0]] = node.attribute[0].t
    for node in model.graph.node:
        if node.op_type != "Reshape" or len(node.input) < 2 or node.input[1] not in constants:
            continue
        if 0 in numpy_helper.to_array(constants[node.input[1]]).tolist():
            continue
        for attribute in node.attribute:
            if attribute.name == "allowzero":
                attribute.i = 0
    return model


class OnnxRuntimeNetwork(nn.Module):
    """An ONNX model run by onnxruntime on CPU: float tensor in, float tensor on the input's device out.

    No gradients pass through it. The session is rebuilt from ``path`` after unpickling.
    """

    def __init__(self, path: str | os.PathLike, providers: list[str] | None = None):
        super().__init__()
        self.path = str(path)
        self.providers = providers or ["CPUExecutionProvider"]
        self._open()

    def _open(self) -> None:
        import onnxruntime

        self.session = onnxruntime.InferenceSession(self.path, providers=self.providers)
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("session", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._open()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            array = x.detach().float().cpu().numpy()
            (out,) = self.session.run([self.output_name], {self.input_name: array})
        return torch.from_numpy(out).to(x.device)
