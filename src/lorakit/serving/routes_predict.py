"""``POST /v1/predict``: the prediction records of a task whose adapters answer ``predict``. The request and
response models come from the task (:attr:`~lorakit.tasks.base.Task.prediction_model`,
``input_description``), so the OpenAPI schema is exactly what this server answers."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, create_model

from lorakit.serving.errors import RESPONSES
from lorakit.serving.served import Served
from lorakit.tasks.base import Task

PATH = "/v1/predict"
AdapterName = Annotated[str, StringConstraints(min_length=1, max_length=80)]
Text = Annotated[str, StringConstraints(max_length=200_000)]


def request_model(task: Task) -> type[BaseModel]:
    """``{adapter, inputs, top_k}``, its inputs described as the task reads them."""
    return create_model(
        "PredictRequest",
        __config__=ConfigDict(extra="forbid"),
        __doc__=f"Predict with {task.name} adapters.",
        adapter=(
            AdapterName,
            Field(description="Adapter name (a registry name may carry a version, name:3)."),
        ),
        inputs=(list[Text], Field(min_length=1, max_length=256, description=task.input_description)),
        top_k=(
            int,
            Field(1, ge=1, le=100, description="How many of the most likely labels to return per answer."),
        ),
    )


def response_model(task: Task) -> type[BaseModel]:
    """``{adapter, predictions: [the task's prediction record, ...]}``."""
    assert task.prediction_model is not None  # tasks that answer `predict` declare their record
    return create_model(
        "PredictResponse",
        adapter=(str, ...),
        predictions=(list[task.prediction_model], ...),  # type: ignore[name-defined]
    )


def add_routes(app: FastAPI, served: Served) -> None:
    """Register ``POST /v1/predict`` for the engine's task."""
    engine, task = served.engine, served.engine.task
    Request, Response = request_model(task), response_model(task)

    async def predict(req: Any) -> Any:
        inputs = await served.in_thread(task.decode_inputs, req.inputs)
        rows: list[Any] = []

        def encode() -> list[Any]:
            rows.extend(engine.encode(req.adapter, inputs))
            return rows

        outputs = await served.run(req.adapter, encode)
        records = await served.in_thread(engine.records, req.adapter, inputs, rows, outputs, req.top_k)
        return Response(adapter=req.adapter, predictions=records)

    predict.__annotations__ = {"req": Request, "return": Response}
    app.post(PATH, response_model=Response, responses=RESPONSES, summary=f"Predict ({task.name})")(predict)
