"""Verification sessions that share the model's weights instead of copying them (issue 20).

A model is serialized for onnxruntime without its large weights; they are given to the session as
``SessionOptions.add_initializer`` OrtValues over the model's own numpy arrays.
"""

from __future__ import annotations

import pathlib
import tempfile
import weakref

import numpy as np
import onnx_ir as ir

from tfgraph.ir import SHAREABLE_TYPES, is_big


class SharedWeights:
    """A model serialized for onnxruntime without its large weights: ``source`` (a file in a temporary
    folder) refers to them as external data that is never read, and ``arrays`` (name -> contiguous
    numpy array, the model's own memory where the tensor holds one) are given to the session with
    ``SessionOptions.add_initializer``: every verification session shares one copy of the weights
    instead of serializing, parsing and copying them again."""

    _cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tensor -> its contiguous array

    def __init__(self, model: ir.Model):
        self._tmp = tempfile.TemporaryDirectory(prefix="tfgraph-session-")
        folder = pathlib.Path(self._tmp.name)
        self.arrays: dict[str, np.ndarray] = {}
        swapped: dict[ir.Value, ir.TensorProtocol] = {}
        offset = 0
        for value in model.graph.initializers.values():
            tensor = value.const_value
            if not is_big(value) or tensor.dtype not in SHAREABLE_TYPES or not isinstance(tensor, (ir.Tensor, ir.ExternalTensor)):
                if isinstance(tensor, ir.ExternalTensor):  # a small one in the model's own data file: inline it
                    swapped[value] = tensor
                    value.const_value = ir.Tensor(tensor.numpy(), name=value.name)
                continue
            array = self._cache.get(tensor)
            if array is None:
                array = np.ascontiguousarray(tensor.numpy())
                if tuple(array.shape) != tuple(tensor.shape.numpy()):
                    continue
                self._cache[tensor] = array
            self.arrays[value.name] = array
            swapped[value] = tensor
            value.const_value = ir.ExternalTensor("weights.bin", offset, tensor.nbytes, tensor.dtype, shape=tensor.shape,
                                                  name=value.name, base_dir=folder)
            offset += tensor.nbytes
        try:
            proto = ir.serde.serialize_model(model)
        finally:
            for value, tensor in swapped.items():
                value.const_value = tensor
        (folder / "weights.bin").touch()  # never read: every tensor in it is given as an initializer
        target = folder / "model.onnx"
        target.write_bytes(proto.SerializeToString())
        self.source = str(target)

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> SharedWeights:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
