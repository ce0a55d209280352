"""The server's OpenAPI 3.1 schema (``GET /openapi.json``) and the Swagger page that shows it (``GET /docs``)."""

from __future__ import annotations

from flaxsst.serve.service import Settings


SWAGGER_PAGE = """<!doctype html>
<html><head><title>flaxsst.serve</title>
<link rel="stylesheet" href="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui.css"></head>
<body><div id="ui"></div>
<script src="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui-bundle.js"></script>
<script>SwaggerUIBundle({url: "/openapi.json", dom_id: "#ui"});</script>
<noscript>The schema is at <a href="/openapi.json">/openapi.json</a>.</noscript></body></html>
"""


def openapi_schema(classifier, settings: Settings, description: str) -> dict:
    """OpenAPI 3.1 for the routes, with the card's sample request and this model's labels."""
    labels = [classifier.config.id2label[i] for i in range(classifier.config.num_labels)]
    prediction = {"type": "object", "properties": {"label": {"type": "string", "enum": labels},
                                                   "score": {"type": "number"}}, "required": ["label", "score"]}
    error = {"type": "object", "properties": {"error": {"type": "string"}, "error_type": {"type": "string"}}}
    texts = {"type": "array", "items": {"type": "string"}, "maxItems": settings.max_texts}
    errors = {str(code): {"description": why, "content": {"application/json": {"schema": error}}} for code, why in (
        (400, "not UTF-8 or not JSON"), (413, "body over --max-body-bytes or more than --max-texts texts"),
        (422, "a wrong shape or a text that is not a string (names the key or index)"),
        (429, "the queue is full (--max-queue): retry after Retry-After seconds"), (503, "shutting down"),
        (504, "not answered within --timeout-ms"))}

    def answer(schema):
        return {"200": {"description": "one answer per text, in order", "content": {"application/json": {"schema": schema}}},
                **errors}

    def status(description):
        return {"200": {"description": description}, "503": {"description": "not ready"}}

    sample = ["Today was an amazing day!", "It was an unfortunate series of events."]
    return {
        "openapi": "3.1.0",
        "info": {"title": "flaxsst.serve", "version": "1", "description": description},
        "paths": {
            "/score": {"post": {
                "summary": "The model card's endpoint: the best label and its score per text",
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": {"oneOf": [{"type": "object", "properties": {"input_data": texts},
                                          "required": ["input_data"]}, texts]},
                    "example": {"input_data": sample}}}},
                "responses": answer({"type": "array", "items": prediction})}},
            "/predict": {"post": {
                "summary": "text-embeddings-inference's classification: every label, highest score first",
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": {"type": "object", "required": ["inputs"], "properties": {
                        "inputs": {"oneOf": [{"type": "string"}, {"type": "array"}]},
                        "raw_scores": {"type": "boolean", "default": False},
                        "truncate": {"type": "boolean", "default": False,
                                     "description": f"texts are cut to {classifier.max_length} tokens either way"}}},
                    "example": {"inputs": sample[0]}}}},
                "responses": answer({"oneOf": [{"type": "array", "items": prediction},
                                               {"type": "array", "items": {"type": "array", "items": prediction}}]})}},
            "/health": {"get": {"summary": "alive", "responses": {"200": {"description": "alive"}}}},
            "/": {"get": {"summary": "alive (Azure ML's liveness route)", "responses": {"200": {"description": "alive"}}}},
            "/ready": {"get": {"summary": "200 once every program is compiled and warm; 503 before, and while draining",
                               "responses": status("ready")}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {"description": "text format"}}}},
            "/v2": {"get": {"summary": "Open Inference Protocol: server metadata",
                            "responses": {"200": {"description": "name, version, extensions"}}}},
            "/v2/health/live": {"get": {"summary": "Open Inference Protocol: live",
                                        "responses": {"200": {"description": "live"}}}},
            "/v2/health/ready": {"get": {"summary": "Open Inference Protocol: ready (as /ready)",
                                         "responses": {"200": {"description": "ready"}, "400": {"description": "not ready"}}}},
            "/v2/models/{name}": {"get": {"summary": "Open Inference Protocol: the model's inputs and outputs",
                                          "responses": {"200": {"description": "metadata"},
                                                        "404": {"description": "another model's name"}}}},
            "/v2/models/{name}/ready": {"get": {"summary": "Open Inference Protocol: the model is ready",
                                                "responses": {"200": {"description": "ready"},
                                                              "400": {"description": "not ready"}}}},
            "/v2/models/{name}/infer": {"post": {
                "summary": "Open Inference Protocol: one BYTES input of texts -> label, score, logits",
                "requestBody": {"required": True, "content": {"application/json": {"example": {
                    "inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": sample}]}}}},
                "responses": {"200": {"description": "outputs label (BYTES), score (FP32), logits (FP32)"},
                              **errors}}},
        },
    }
