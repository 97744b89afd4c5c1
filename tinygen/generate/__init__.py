"""Generation on token ids, and text in and out. The decode path, one step per module:

- plan.py: what a loaded model becomes before it decodes (--quantize, --compile), in one place;
- quantize.py, fastlinear.py: the int8/int4 layers and the CPU decode step's products it swaps in;
- engine.py: prefill once, then decode token by token from the KV cache, rows batched continuously;
- compiled.py: the compiled batch-1 decode step the engine calls instead of its own;
- sampling.py: logits to the next token;
- textgen.py, chat.py, requests.py: text, conversations and batch requests around the engine.

Imports only core.
"""
