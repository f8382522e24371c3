// Runs GGUF files in the real llama.cpp (node-llama-cpp) for loraq's tests and benchmarks.
// Usage: node llama_cpp_runner.mjs JOB.json RESULT.json
// JOB: {"threads": 1, "models": [{"path": "...", "loras": ["..."], "context": 512, "tasks": [TASK, ...]}]}
// TASK kinds (results in the same order):
//   {"kind": "generate", "tokens": [...], "max_tokens": 16}  -> {"tokens": [...]}  greedy; stops after an end-of-generation token
//   {"kind": "tokenize", "text": "...", "special": true}     -> {"tokens": [...]}  llama.cpp's own tokenizer
//   {"kind": "probabilities", "tokens": [...]}               -> {"probs": [[p_0..p_V-1] per position]}  softmax of the logits
//   {"kind": "nll", "tokens": [...]}                         -> {"nll": sum of -ln p(next token), "count": n}
//   {"kind": "render_chat", "messages": [...]}               -> {"text": "..."}   the file's chat template, llama.cpp's Jinja engine
//   {"kind": "metadata"}                                     -> {"architecture", "chat_template", "n_vocab", "add_bos"}
//   {"kind": "timed", "tokens": [...], "new_tokens": 128}    -> {"tokens": [...], "prefill_s", "decode_s"}  greedy, exactly
//        new_tokens (end-of-generation tokens banned, no repeat penalty); prefill_s: the prompt up to the first new token,
//        decode_s: the other new_tokens - 1
import {getLlama, TokenBias} from "node-llama-cpp";
import fs from "node:fs";

const [jobPath, resultPath] = process.argv.slice(2);
const job = JSON.parse(fs.readFileSync(jobPath, "utf8"));
const llama = await getLlama({gpu: false, build: "never", logLevel: "error"});
const sampling = {temperature: 1, topK: 0, topP: 1, minP: 0};

function vocabularySize(model) {
    return model.fileInfo.metadata.tokenizer.ggml.tokens.length;
}

async function greedy(model, sequence, tokens, maxTokens) {
    const out = [];
    // evaluate() is never left early (breaking out leaves the sequence locked): maxTokens bounds it
    for await (const token of sequence.evaluate(tokens, {temperature: 0})) {
        out.push(token);
        if (out.length >= maxTokens || model.isEogToken(token)) break;
    }
    return out;
}

function endOfGenerationBanned(model) {
    // TokenBias.set skips end-of-generation tokens (node-llama-cpp 3.21.1), so they go into its map directly
    const bias = new TokenBias(model.tokenizer);
    for (let t = 0; t < vocabularySize(model); t++) if (model.isEogToken(t)) bias._biases.set(t, -Infinity);
    return bias;
}

async function timed(model, sequence, tokens, newTokens) {
    // one controlledEvaluate per token: exactly newTokens, and no evaluate() generator ever left early
    const next = {generateNext: {token: true, options: {temperature: 0, repeatPenalty: false,
                                                        tokenBias: endOfGenerationBanned(model)}}};
    const step = async (items) => (await sequence.controlledEvaluate(items))[items.length - 1].next.token;
    const start = performance.now();
    const out = [await step(tokens.map((t, i) => (i + 1 < tokens.length ? t : [t, next])))];
    const prefilled = performance.now();
    while (out.length < newTokens) out.push(await step([[out[out.length - 1], next]]));
    const end = performance.now();
    return {tokens: out, prefill_s: (prefilled - start) / 1000, decode_s: (end - prefilled) / 1000};
}

async function nextProbabilities(sequence, tokens) {
    const items = tokens.map((t) => [t, {generateNext: {probabilities: true, options: sampling}}]);
    return (await sequence.controlledEvaluate(items)).map((r) => r.next.probabilities);
}

async function runTask(llamaModel, context, task) {
    const sequence = context.getSequence();
    try {
        if (task.kind === "generate")
            return {tokens: await greedy(llamaModel, sequence, task.tokens, task.max_tokens)};
        if (task.kind === "timed")
            return await timed(llamaModel, sequence, task.tokens, task.new_tokens);
        if (task.kind === "tokenize")
            return {tokens: Array.from(llamaModel.tokenize(task.text, task.special ?? true))};
        if (task.kind === "probabilities") {
            const maps = await nextProbabilities(sequence, task.tokens);
            const size = vocabularySize(llamaModel);
            return {probs: maps.map((m) => { const row = new Array(size).fill(0); for (const [t, p] of m) row[t] = p; return row; })};
        }
        if (task.kind === "nll") {
            // in chunks: a full-vocabulary map per position is large, so only one chunk's maps are alive at a time
            let nll = 0;
            for (let start = 0; start + 1 < task.tokens.length; start += 64) {
                const chunk = task.tokens.slice(start, Math.min(start + 64, task.tokens.length - 1));
                const maps = await nextProbabilities(sequence, chunk);
                maps.forEach((m, i) => { nll -= Math.log(m.get(task.tokens[start + i + 1])); });
            }
            return {nll, count: task.tokens.length - 1};
        }
        if (task.kind === "render_chat") {
            const template = llamaModel.fileInfo.metadata.tokenizer.chat_template;
            const renderer = new llama._bindings.AddonJinjaRenderer(template);
            return {text: renderer.render({messages: task.messages, add_generation_prompt: true,
                                           bos_token: "", eos_token: ""})};
        }
        if (task.kind === "metadata") {
            const meta = llamaModel.fileInfo.metadata;
            return {architecture: meta.general.architecture, chat_template: meta.tokenizer?.chat_template ?? null,
                    n_vocab: vocabularySize(llamaModel),
                    add_bos: llamaModel.tokens.shouldPrependBosToken};
        }
        throw new Error(`unknown task kind ${task.kind}`);
    } finally {
        sequence.dispose();
    }
}

const results = [];
for (const spec of job.models) {
    const model = await llama.loadModel({modelPath: spec.path});
    const lora = (spec.loras ?? []).length ? {adapters: spec.loras.map((p) => ({filePath: p}))} : undefined;
    const context = await model.createContext({contextSize: spec.context ?? 512, sequences: 1,
                                               threads: job.threads ?? 1, lora});
    const taskResults = [];
    for (const task of spec.tasks) taskResults.push(await runTask(model, context, task));
    results.push(taskResults);
    await context.dispose();
    await model.dispose();
}
fs.writeFileSync(resultPath, JSON.stringify(results));
process.stdout.write("", () => process.exit(0));
