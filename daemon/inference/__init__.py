"""The inference core: the engine contract every backend implements (`engine`), continuous batching
on top of a backend's model runner (`batching` over the pure `scheduler`), sampling, detokenizing
with stop strings, the batched KV cache, the tokenizer with its chat template, and the factory that
loads a backend by name (`backends`). Nothing here knows of HTTP, the cluster or the node."""
