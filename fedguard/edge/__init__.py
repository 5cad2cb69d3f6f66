"""The edge path: distil the global model, export int8 ONNX, write its model card.

Modules (imported on demand; this package's import loads nothing heavy, so the
torch-free :mod:`fedguard.edge.predict` stays torch-free):

* :mod:`fedguard.edge.distill` — knowledge distillation, federated (DP-SGD,
  charged to each silo's ledger) or server-side (no privacy cost);
* :mod:`fedguard.edge.quantize` — ONNX export with the scaler folded in, int8
  quantization, the int8-vs-fp32 check;
* :mod:`fedguard.edge.card` — model cards (Markdown and JSON);
* :mod:`fedguard.edge.export` — the pipeline from a saved run folder;
* :mod:`fedguard.edge.predict` — inference with only numpy and onnxruntime;
* :mod:`fedguard.cli.edge` — the ``export`` and ``predict`` subcommands.
"""
