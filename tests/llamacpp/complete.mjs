// Greedy continuation by llama.cpp (node-llama-cpp), optionally with a
// GGUF LoRA adapter: the check that a GGUF file oxtune wrote is what
// llama.cpp expects.
// usage: node complete.mjs MODEL.gguf PROMPT MAX_TOKENS [ADAPTER.gguf]
// prints {"prompt": [ids llama.cpp tokenised PROMPT into], "generated": [ids], "text": TEXT} as JSON
import {getLlama} from "node-llama-cpp";
const [file, prompt, n = "16", adapter] = process.argv.slice(2);
const llama = await getLlama({gpu: false, build: "never", logLevel: "error"});
const model = await llama.loadModel({modelPath: file});
const options = {contextSize: 256, threads: 2};
if (adapter) options.lora = {adapters: [{filePath: adapter, scale: 1}]};
const ctx = await model.createContext(options);
const tokens = model.tokenize(prompt);
const generated = [];
for await (const token of ctx.getSequence().evaluate(tokens, {temperature: 0})) {
    if (model.isEogToken(token)) break;
    generated.push(token);
    if (generated.length >= Number(n)) break;
}
console.log(JSON.stringify({prompt: Array.from(tokens), generated, text: model.detokenize(generated)}));
await llama.dispose();
