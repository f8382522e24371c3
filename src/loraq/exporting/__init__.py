"""Export to GGUF, the file llama.cpp, Ollama and LM Studio run, written by loraq itself.

* :mod:`loraq.exporting.gguf_arch`: per model family, the GGUF architecture, its
  hyper-parameter keys and the Hugging Face -> llama.cpp tensor names (with
  the Q/K row permutation llama.cpp's ``llama`` graph expects);
* :mod:`loraq.exporting.gguf_tokenizer`: the tokenizer as GGUF metadata (tokens,
  types, merges, special ids, the pre-tokenizer llama.cpp must use, the chat
  template);
* :mod:`loraq.exporting.tensors`: the model's tensors as a lazy stream, from a
  folder's safetensors or from a model in memory (LoRA merged per tensor);
* :mod:`loraq.exporting.kquants`: Q4_K and Q6_K blocks (for ``--quant q4_k_m``);
* :mod:`loraq.exporting.gguf`: the plan (which tensor in which GGML type) and the
  writer (one tensor at a time, temporary file renamed at the end);
* :mod:`loraq.exporting.metadata`: ``general.*`` + hyper-parameters + tokenizer keys;
* :mod:`loraq.exporting.lora_gguf`: an adapter alone as a llama.cpp LoRA file;
* :mod:`loraq.exporting.modelfile`: an Ollama ``Modelfile`` beside the GGUF;

``loraq.export(...)`` (:mod:`loraq.api.export`) and ``loraq export`` sit on top.
"""
