"""The tiny zoo: the default study's checkpoints of the real transformers classes, trained on the toy world.

    tokenizer.py        the word-level tokenizer over the toy world's vocabulary
    pretrain.py         tiny CLIP and DINOv2 (pretrain_siglip.py: tiny SigLIP), their training and checks
    pretrained.py       one pretrain entry trained, saved and checked (params `pretrain`)
    captioner.py        the families' caption recipe: a tiny VLM (or a connector variant) learns to caption
    train.py            the zoo stage's work: fingerprints, order, parallel workers, one entry's training
    variants.py         a connector variant trained on its base (the train_connector stage)
"""
