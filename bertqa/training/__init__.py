"""The parts of a training run that `bertqa.engine` puts together: where a run stands (`state`), the hooks that run
beside the loop (`hooks`), the loss, optimizer and schedule, checkpoints, records, precision and devices, signals, the
time budget, evaluation during a run, and `setup`, which builds each of them from a `TrainConfig` for `fit`."""
