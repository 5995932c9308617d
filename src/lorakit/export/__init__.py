"""Adapters out of lorakit: merged into the base and proved (``merge``, ONNX too), GGUF files for
llama.cpp / Ollama (``gguf``), vLLM's layout (``vllm``).

May import: the layers up to ``evaluation``.
"""
