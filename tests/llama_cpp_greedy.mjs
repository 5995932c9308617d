// Run by tests/test_gguf_export.py with llama.cpp's prebuilt binary from node-llama-cpp (make llama-cpp-env):
// greedy continuations of prompts given as token ids, from a GGUF model and optionally a GGUF LoRA file.
//
// Usage: node llama_cpp_greedy.mjs JOB.json ANSWERS.json
//   JOB: {"module": ".../node-llama-cpp/dist/index.js", "model": "x.gguf", "lora": "lora.gguf" | null,
//         "prompt_ids": [[...], ...], "max_new_tokens": 12}
//   ANSWERS: the generated token ids of each prompt (stopping at an end-of-generation token)
import { readFileSync, writeFileSync } from "node:fs";
import { availableParallelism } from "node:os";

const job = JSON.parse(readFileSync(process.argv[2], "utf8"));
const { getLlama, LlamaLogLevel } = await import(job.module);
// One thread per core this process may use (OMP_NUM_THREADS under pytest-xdist): node-llama-cpp's
// default on CPUs is twice the cores, and llama.cpp's spinning threads then take 80x as long (2 cores:
// 28 s instead of 0.35 s for 12 tokens of SmolLM2-135M).
const threads = Number(process.env.OMP_NUM_THREADS) || availableParallelism();
const llama = await getLlama({ gpu: false, logLevel: LlamaLogLevel.error, maxThreads: threads });
const model = await llama.loadModel({ modelPath: job.model });
const answers = [];
for (const ids of job.prompt_ids) {
  const context = await model.createContext({
    contextSize: 512,
    threads,
    ...(job.lora ? { lora: { adapters: [{ filePath: job.lora }] } } : {}),
  });
  const sequence = context.getSequence();
  const out = [];
  for await (const token of sequence.evaluate(ids, { temperature: 0 })) {
    if (model.isEogToken(token)) break;
    out.push(token);
    if (out.length >= job.max_new_tokens) break;
  }
  answers.push(out);
  await context.dispose();
}
writeFileSync(process.argv[3], JSON.stringify(answers));
await model.dispose();
