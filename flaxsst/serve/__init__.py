"""``python -m flaxsst.serve --model DIR_OR_HUB_ID``: the model card's real-time endpoint over HTTP.

``POST /score`` (the card's ``{"input_data": [...]}``), ``POST /predict`` (text-embeddings-inference's
classification), ``GET /health``, ``GET /ready``, ``GET /metrics`` (Prometheus), ``GET /openapi.json``
and ``/docs``; the texts of concurrent requests share batches (``flaxsst.serve.batcher``).

Rooms: ``server`` (the command line, start-up and shutdown), ``app`` (routes, limits, metrics),
``batcher`` (dynamic batching over ``Classifier``), ``protocol`` (the request formats),
``azureml_score`` (the same model under Azure ML's inference server).
"""
