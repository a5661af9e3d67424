"""The LLM experiment kit: one experiment as one typed config (:mod:`.runconfig`), its parts and shards
(:mod:`.grid`), one part from load to row and resume (:mod:`.parts`), the rate policy and sweep (:mod:`.rates`),
the report (:mod:`.report`), the run of it all (:mod:`.experiment`) and its progress lines (:mod:`.progress`); under them model loading (:mod:`.models`),
tasks (:mod:`.tasks`, :mod:`.hf_data`), metrics (:mod:`.metrics`), the fine-tuning loop (:mod:`.finetune`) and
registry fetching (:mod:`.fetch`). ``benchmarks/reproduce.py`` is a command line over :mod:`.experiment`.

Apart from the ecosystem bridges in :mod:`tying.integrations` (transformers, timm, gymnasium, peft),
which adapt models, these modules run experiments.
"""
