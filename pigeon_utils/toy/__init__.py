"""The toy backbone: a small LaVIT-shaped model trained by :mod:`pigeon_utils.toy.build`, shipped in
``checkpoints/toy`` and loaded with ``pigeon_utils.worlds.load_backbone("toy", "checkpoints/toy")``.

Modules: :mod:`~pigeon_utils.toy.tokenizer` (dynamic visual tokenizer), :mod:`~pigeon_utils.toy.text` (text
tokenizer and id layout), :mod:`~pigeon_utils.toy.lmm` (Llama, pre-training, generation rule),
:mod:`~pigeon_utils.toy.detokenizer`, :mod:`~pigeon_utils.toy.decoder` (UNet + DDIM + patch autoencoder),
:mod:`~pigeon_utils.toy.clip` (open_clip judge), :mod:`~pigeon_utils.toy.evaluate` (the issue's figures),
:mod:`~pigeon_utils.toy.load` and :mod:`~pigeon_utils.toy.io` (checkpoint files). The build:
:mod:`~pigeon_utils.toy.recipe` (what is built), :mod:`~pigeon_utils.toy.training_data` (what it trains on besides
fresh renders), :mod:`~pigeon_utils.toy.build` (the pipeline and its command). The toy world itself (factors,
rendering, the toy-sticker / toy-poster datasets): :mod:`~pigeon_utils.toy.data`; docs/toy-world.md describes it.
"""
