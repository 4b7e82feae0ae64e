"""Products built on a trained model: export to ONNX (`export`), the backends that run a model folder
(`backends`), the `Answerer` that answers questions with it (`serving`) and the HTTP service with its page
(`service`). The core library never imports them."""
