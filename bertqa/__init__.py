"""bertqa: fine-tune BERT-family models on extractive question answering (SQuAD v1.1 and v2.0), in plain PyTorch.

Modules, in the order data flows: `config` (the training config), `loading` (read and validate), `data` (windows and
labels), `cache` (a run's windows, cached), `batching`, `model` (tokenizer and model factory), `optim`, `engine` (the
training loop on Accelerate), `inference` (logits, evaluation, answers), `postprocess` (logits -> answers),
`metrics` (official SQuAD EM/F1), `checkpoint`, `reporting`. See the README's "How the code is laid out".
Importing the package imports none of them, so `import bertqa.data` stays cheap.
"""

__version__ = "0.1.0"
