"""The toy backbone: a small LaVIT-shaped model trained by :mod:`pigeon_utils.toy.build`, shipped in
``checkpoints/toy`` and loaded with ``pigeon_utils.backbone.load_backbone("toy", "checkpoints/toy")``.

Modules: :mod:`~pigeon_utils.toy.tokenizer` (dynamic visual tokenizer), :mod:`~pigeon_utils.toy.text` (text
tokenizer and id layout), :mod:`~pigeon_utils.toy.lmm` (Llama, pre-training, generation rule),
:mod:`~pigeon_utils.toy.detokenizer`, :mod:`~pigeon_utils.toy.decoder` (UNet + DDIM + patch autoencoder),
:mod:`~pigeon_utils.toy.clip` (open_clip judge), :mod:`~pigeon_utils.toy.evaluate` (the issue's figures),
:mod:`~pigeon_utils.toy.load` and :mod:`~pigeon_utils.toy.io` (checkpoint files).
"""
