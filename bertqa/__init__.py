"""bertqa: fine-tune BERT-family models on extractive question answering (SQuAD v1.1 and v2.0), in plain PyTorch.

Modules: `data` (load, window, label), `model` (tokenizer and model factory), `postprocess` (logits -> answers),
`metrics` (official SQuAD EM/F1), `config` (the training config), `engine` (the train/eval loop on Accelerate).
Importing the package imports none of them, so `import bertqa.data` stays cheap.
"""

__version__ = "0.1.0"
