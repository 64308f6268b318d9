"""runtime layer: the device. One resident base, many assets' adapters, atomic hot swap, an HTTP API.

- :mod:`~edgepeft.runtime.resident`: the base loaded once; per-version models whose frozen tensors alias it;
- :mod:`~edgepeft.runtime.cache`: LRU of loaded versions under a RAM budget;
- :mod:`~edgepeft.runtime.state`: what persists across restarts (``STATE/state.json`` + installed versions);
- :mod:`~edgepeft.runtime.service`: :class:`~edgepeft.runtime.service.DeviceRuntime`, install/activate/rollback/score;
- :mod:`~edgepeft.runtime.server`: the FastAPI shell; :mod:`~edgepeft.runtime.commands`: ``edgepeft serve``;
- :mod:`~edgepeft.runtime.onnx`: ONNX Runtime engine (LoRA as graph inputs), merged export, int8;

Its load test and benchmarks live in ``edgepeft.bench`` (a device install leaves them out). Importing this
package imports nothing heavy; torch, peft and ONNX Runtime load with the modules that need them.
"""
