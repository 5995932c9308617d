"""``POST /v1/chat/completions``: OpenAI's chat-completion shape, for a task whose adapters answer
``generate``; ``model`` names the adapter. The conversation is rendered by the task
(:meth:`~lorakit.tasks.base.Task.chat_prompt_ids`) and answered in the engine's batches."""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Literal

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from lorakit.serving.errors import RESPONSES, ApiError
from lorakit.serving.served import Served
from lorakit.tasks.base import GenerateOptions

PATH = "/v1/chat/completions"
AdapterName = Annotated[str, StringConstraints(min_length=1, max_length=80)]
Text = Annotated[str, StringConstraints(max_length=200_000)]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: Text


class ChatRequest(BaseModel):
    """OpenAI chat completion request; ``model`` names the adapter. Unknown OpenAI fields are ignored."""

    model_config = ConfigDict(extra="ignore")
    model: AdapterName
    messages: list[ChatMessage] = Field(min_length=1, max_length=128)
    max_tokens: int | None = Field(None, ge=1, le=4096)
    max_completion_tokens: int | None = Field(None, ge=1, le=4096)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=1, description="Only one choice per request.")
    stream: Literal[False] = Field(False, description="Streaming is not supported.")


class ChoiceMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int
    message: ChoiceMessage
    finish_reason: Literal["stop", "length"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


def options_for(req: ChatRequest, prompt_tokens: int, context_length: int | None) -> GenerateOptions:
    """The request's generation settings, its answer capped to what the model's context leaves.

    Raises:
        ApiError: The conversation alone fills the context (422).
    """
    max_new = req.max_completion_tokens or req.max_tokens or 256
    if context_length:
        if prompt_tokens >= context_length:
            raise ApiError(
                422,
                f"messages: the conversation is {prompt_tokens} tokens and this model reads "
                f"at most {context_length}; shorten it",
            )
        max_new = min(max_new, context_length - prompt_tokens)
    sample = req.temperature > 0
    return GenerateOptions(max_new, sample, req.temperature if sample else 1.0, req.top_p if sample else 1.0)


def add_routes(app: FastAPI, served: Served) -> None:
    """Register ``POST /v1/chat/completions`` for the engine's task."""
    engine = served.engine

    @app.post(PATH, response_model=ChatResponse, responses=RESPONSES, summary=f"Chat ({engine.task.name})")
    async def chat(req: ChatRequest) -> ChatResponse:
        messages = [m.model_dump() for m in req.messages]
        prompt = await served.in_thread(engine.encode_chat, req.model, messages)
        options = options_for(req, len(prompt), engine.context_length)
        text = (await served.run(req.model, lambda: [prompt], options))[0]
        completion = len(engine.processor(text, add_special_tokens=False)["input_ids"]) if text else 0
        return ChatResponse(
            id=f"chatcmpl-{uuid.uuid4().hex[:24]}",
            created=int(time.time()),
            model=req.model,
            choices=[
                Choice(
                    index=0,
                    message=ChoiceMessage(content=text),
                    finish_reason="length" if completion >= options.max_new_tokens else "stop",
                )
            ],
            usage=Usage(
                prompt_tokens=len(prompt), completion_tokens=completion, total_tokens=len(prompt) + completion
            ),
        )
