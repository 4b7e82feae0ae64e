"""bertqa: fine-tune BERT-family models on extractive question answering (SQuAD v1.1 and v2.0), in plain PyTorch.

Modules, in the order data flows: `config` (the training config), `loading` and `examples` (read and validate),
`sources` (which examples a run uses), `data` (windows and labels), `cache` (a run's windows, cached), `batching`,
`model` (tokenizer and model factory), `hub` (whether the hub can be used), `optim`, `runtime` (precision and the
Accelerator), `state` (where a loop stands, how it stops), `interrupt` (Ctrl-C and SIGTERM), `engine` (the training
loop's pieces and `fit`), `distill` (a teacher's loss), `inference` (logits and evaluation), `serving` (answering
with a saved model), `backends` (PyTorch or ONNX Runtime under it), `export` (ONNX and int8), `service` (the HTTP
service), `postprocess` (logits -> answers), `metrics` (official SQuAD EM/F1), `checkpoint`, `reporting`,
and `cli` (what the scripts share). See the README's "How the code is laid out". Importing the package imports none
of them, so `import bertqa.data` stays cheap.
"""

__version__ = "0.1.0"
