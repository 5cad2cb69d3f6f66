"""The edge path: distil the global model, export int8 ONNX, write its model card.

Modules (imported on demand; this package's import loads nothing heavy, so the
torch-free :mod:`fedguard.edge.predict` stays torch-free):

* :mod:`fedguard.edge.distill` — knowledge distillation, federated (DP-SGD,
  charged to each silo's ledger) or server-side (no privacy cost);
* :mod:`fedguard.edge.student` — the student's architecture (MLP or small CNN);
* :mod:`fedguard.edge.quantize` — ONNX export with the scaler folded in, int8
  quantization, the int8-vs-fp32 check;
* :mod:`fedguard.edge.card` — model cards: the Markdown rendering and the ledger readout;
* :mod:`fedguard.edge.card_builder` — the model card's JSON, one function per section;
* :mod:`fedguard.edge.measure` — latency, throughput, artifact size, pooled metrics;
* :mod:`fedguard.edge.export` — the pipeline from a saved run folder, stage by stage;
* :mod:`fedguard.edge.predict` — inference with only numpy and onnxruntime;
* :mod:`fedguard.cli.edge` — the ``export`` and ``predict`` subcommands.
"""
