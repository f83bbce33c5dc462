// llama.cpp (node-llama-cpp 3.21.1, prebuilt) decoding B sequences at once in one context:
// the batched peer of `oxtune bench infer --batch-sizes B`. Each sequence continues the same
// prompt greedily; node-llama-cpp evaluates the sequences' next tokens in one batch per step.
// usage (from target/llamacpp, where .ci/fetch-llamacpp installed node-llama-cpp):
//   node llamacpp_decode_batch.mjs MODEL.gguf [THREADS] [NEW_TOKENS] [SEQUENCES]
import {getLlama, LlamaCompletion} from "node-llama-cpp";
const [file, threads = "2", n = "128", sequences = "8"] = process.argv.slice(2);
const count = Number(sequences);
const llama = await getLlama({gpu: false, build: "never"});
const model = await llama.loadModel({modelPath: file});
const ctx = await model.createContext({contextSize: 512 * count, sequences: count, threads: Number(threads)});
const prompt = "The history of the Roman Empire is long and complicated. It began when ";
const completions = Array.from({length: count}, () => new LlamaCompletion({contextSequence: ctx.getSequence()}));
const t0 = performance.now();
const outs = await Promise.all(completions.map((c) => c.generateCompletion(prompt, {maxTokens: Number(n), temperature: 0})));
const s = (performance.now() - t0) / 1000;
const tokens = outs.reduce((sum, out) => sum + model.tokenize(out).length, 0);
console.log(JSON.stringify({threads: Number(threads), sequences: count, tokens, seconds: s, tokens_per_s: tokens / s}));
