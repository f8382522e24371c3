"""LoRA adapters: the layer, targeting, initialisation (incl. LoftQ on CPU), merging, PEFT-format files.

Public entry points (see docs/DESIGN.md, "lora/"):

* :func:`loraq.lora.model.inject_lora`, :func:`~loraq.lora.model.count_parameters`,
  :func:`~loraq.lora.model.trainable_summary`, :func:`~loraq.lora.model.merge_and_unload`,
  :func:`~loraq.lora.model.disable_adapters`, :func:`~loraq.lora.model.set_adapter`,
  :func:`~loraq.lora.model.add_weighted_adapter`, :func:`~loraq.lora.model.lora_state_dict`
* :func:`loraq.lora.files.save_adapter`, :func:`~loraq.lora.files.load_adapter`,
  :func:`~loraq.lora.files.read_adapter_config`
* :func:`loraq.api.merge.merge` (``loraq merge``)
"""
