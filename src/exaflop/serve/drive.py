"""/v1/drive/predict: camera frames in, waypoints and steering out, from a driving run.

Until a driving run is passed to `exaflop serve`, every request is answered with a
404 in the OpenAI error shape naming the model.
"""

from __future__ import annotations

from fastapi import Request

from exaflop.serve.protocol import APIError


async def predict(server, request: Request):
    model = request.query_params.get("model")
    if not server.drive:
        raise APIError(404, "no driving model is served here; start `exaflop serve` with a drive run "
                       "(its id is the run name)", param="model", code="model_not_found")
    raise APIError(404, f"The model `{model}` is not a driving model served here", param="model",
                   code="model_not_found")
