"""The LLM experiment kit: model loading (:mod:`.models`), tasks (:mod:`.tasks`, :mod:`.hf_data`),
metrics (:mod:`.metrics`), the fine-tuning loop (:mod:`.finetune`) and registry fetching (:mod:`.fetch`).

Apart from the ecosystem bridges in :mod:`tying.integrations` (transformers, timm, gymnasium, peft),
which adapt models, these modules run experiments.
"""
