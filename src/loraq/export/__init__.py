"""Export to GGUF, the file llama.cpp, Ollama and LM Studio run, written by loraq itself.

* :mod:`loraq.export.gguf_arch`: per model family, the GGUF architecture, its
  hyper-parameter keys and the Hugging Face -> llama.cpp tensor names (with
  the Q/K row permutation llama.cpp's ``llama`` graph expects);
* :mod:`loraq.export.gguf_tokenizer`: the tokenizer as GGUF metadata (tokens,
  types, merges, special ids, the pre-tokenizer llama.cpp must use, the chat
  template);
* :mod:`loraq.export.tensors`: the model's tensors as a lazy stream, from a
  folder's safetensors or from a model in memory (LoRA merged per tensor);
* :mod:`loraq.export.kquants`: Q4_K and Q6_K blocks (for ``--quant q4_k_m``);
* :mod:`loraq.export.gguf`: the plan (which tensor in which GGML type) and the
  writer (one tensor at a time, temporary file renamed at the end);
* :mod:`loraq.export.lora_gguf`: an adapter alone as a llama.cpp LoRA file;
* :mod:`loraq.export.modelfile`: an Ollama ``Modelfile`` beside the GGUF;
* :mod:`loraq.export.api`: ``loraq.export(...)``, the ``loraq export`` command's twin.
"""
